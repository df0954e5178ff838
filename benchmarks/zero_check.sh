#!/usr/bin/env bash
# DeepSpeed ZeRO-2 and ZeRO-3 on one GPU (--num_processes 1) through the shipped launcher configs, and a ZeRO-3
# model save that gathers the full weights (docs/distributed.md). Called by benchmarks/gpu_check.sh, after it has
# installed the carried wheels and exported PYTHONPATH/DPOKIT_CACHE; results in $OUT/gpu.txt and $OUT/zero*.
# DeepSpeed is not a dpokit dependency and the GPU machine has no network: carry its wheels in .whl_ds/, built where
# PyPI is reachable:  pip wheel --no-deps -w .whl_ds deepspeed einops hjson msgpack ninja
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ! ls .whl_ds/*.whl > /dev/null 2>&1; then
  echo "zero: skipped, no DeepSpeed wheels in .whl_ds/ (ZeRO-2/3 untested)" | tee -a "$OUT/gpu.txt"; exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_ds .whl_ds/*.whl || exit 1
export PYTHONPATH=/tmp/site_ds:${PYTHONPATH:-$PWD/src}
for stage in 2 3; do
  # fp32: the launcher configs leave mixed precision to dpokit, and one GPU needs no bf16 to run the tiny model.
  timeout 600 python3 -m accelerate.commands.launch --config_file "configs/accelerate/deepspeed_zero$stage.yaml" \
    --num_processes 1 --main_process_port 0 -m dpokit train configs/tiny.yaml --set "output.dir=/tmp/run_zero$stage" \
    --set train.max_steps=8 --set train.precision=fp32 --set eval.enabled=false > "$OUT/zero$stage.log" 2>&1
  echo "zero$stage train rc=$?" | tee -a "$OUT/gpu.txt"
  tail -4 "$OUT/zero$stage.log"
  cp "/tmp/run_zero$stage/train_summary.json" "$OUT/zero${stage}_train_summary.json" 2>/dev/null
done
# ZeRO-3 partitions every weight; model/ must hold them gathered at full size, loadable by plain transformers.
python3 - << 'EOF' 2>&1 | grep -v -i warn | tee -a "$OUT/gpu.txt"
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

run = Path("/tmp/run_zero3")
summary = json.loads((run / "train_summary.json").read_text())
dist = summary.get("distributed") or {}
weights = {}
for f in sorted((run / "model").glob("*.safetensors")):
    weights.update(load_file(f))
model = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)
shapes_ok = all(weights[n].shape == p.shape for n, p in model.named_parameters() if n in weights)
empty = [n for n, t in weights.items() if t.numel() == 0]
total = sum(t.numel() for t in weights.values())
full = (dist.get("parameters") or {}).get("full")
ok = bool(weights) and shapes_ok and not empty and full is not None and total >= full
print(f"zero3 save: type={dist.get('type')} zero_stage={dist.get('zero_stage')} saved elements={total} "
      f"full={full} empty tensors={len(empty)} shapes match={shapes_ok} -> {'OK' if ok else 'FAILED'}")
EOF
