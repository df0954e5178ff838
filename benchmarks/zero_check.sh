#!/usr/bin/env bash
# DeepSpeed ZeRO-2 and ZeRO-3 on one GPU (--num_processes 1) through the shipped launcher configs, and a ZeRO-3
# model save that gathers the full weights (docs/distributed.md). Its own device command, after gpu_check.sh:
#   bash benchmarks/zero_check.sh        # (carry .whl and .whl_ds) results appended to $OUT/gpu.txt, logs and summaries in $OUT/zero.tar.gz
# Budget: the timeouts sum to 320 s (two runs of 8 steps and the save check), one 10-minute command with room for a
# rerun; at most 2 files under $OUT. DeepSpeed has no wheel on PyPI: benchmarks/gpu_wheels.sh builds one into
# .whl_ds/ (with its dependencies); without it the check is skipped with a line saying so.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DPOKIT_CACHE=${DPOKIT_CACHE:-/tmp/dpokit-cache}
note() { echo "$*" | tee -a "$OUT/gpu.txt"; }
if ! ls .whl_ds/*.whl > /dev/null 2>&1; then
  note "zero: skipped, no DeepSpeed wheels in .whl_ds/ (ZeRO-2/3 untested)"; exit 0
fi
for dir in .whl .whl_ds; do  # idempotent: a fresh machine has neither installed
  ls "$dir"/*.whl > /dev/null 2>&1 || continue
  timeout 40 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$dir"/*.whl \
    || note "zero: installing $dir failed (rc=$?), continuing"
done
export PYTHONPATH=/tmp/site:$PWD/src
LOGS=$(mktemp -d)
for stage in 2 3; do
  # fp32 on both sides: the launcher configs leave mixed precision to dpokit, and model.dtype=float32 loads fp32
  # weights (model.dtype auto would load bf16 on a GPU that supports it: not an fp32 run).
  timeout 120 python3 -m accelerate.commands.launch --config_file "configs/accelerate/deepspeed_zero$stage.yaml" \
    --num_processes 1 --main_process_port 0 -m dpokit train configs/tiny.yaml --overwrite --set "output.dir=/tmp/run_zero$stage" \
    --set train.max_steps=8 --set train.precision=fp32 --set model.dtype=float32 --set eval.enabled=false \
    > "$LOGS/zero$stage.log" 2>&1
  note "zero$stage train rc=$?"
  tail -4 "$LOGS/zero$stage.log"
  cp "/tmp/run_zero$stage/train_summary.json" "$LOGS/zero${stage}_train_summary.json" 2>/dev/null
done
# ZeRO-3 partitions every weight; model/ must hold them gathered at full size, loadable by plain transformers.
timeout 40 python3 - << 'PY' 2>&1 | grep -v -i warn | tee -a "$OUT/gpu.txt"
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
PY
tar -czf "$OUT/zero.tar.gz" -C "$LOGS" . && rm -rf "$LOGS"
