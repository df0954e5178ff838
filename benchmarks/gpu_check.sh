#!/usr/bin/env bash
# One prepared GPU session (docs/gpu-engine.md, README "Speed"), under 8 minutes on one H100/H200: installs carried
# wheels, runs the engine benchmark (benchmarks/gpu.py: both shapes, TRL vs each dpokit backend, one JSON per shape),
# the packing/engine CPU tests on CUDA-capable torch (self-checks), the throughput benchmark on CUDA in bf16 on the
# SmolLM2-135M-shaped LLaMA and the 16M LLaMA, and a short bf16 training run end to end.
# Usage on the device machine: bash benchmarks/gpu_check.sh   (results under $OUT, default /tmp/out)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DPOKIT_CACHE=/tmp/dpokit-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
if ! python3 -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)"; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl_pa/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, trl, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
# 1. the engine benchmark: at most 5 minutes for both shapes (5 arms x 13 steps each); JSON per shape
timeout 300 python3 benchmarks/gpu.py --out-dir "$OUT" 2>&1 | grep -v -E "Warning|warn" | tail -40
echo "gpu.py rc=${PIPESTATUS[0]}" | tee -a "$OUT/gpu.txt"
# 2. the throughput comparison, trimmed to fit (one timed round)
timeout 45 python3 benchmarks/throughput.py --device cuda --dtype bf16 --attn sdpa --model llama-135m --pairs 128 --rounds 1 \
  --warmup-rounds 1 --out "$OUT/throughput_llama135m_cuda.json" 2>&1 | grep -v -E "Warning|warn" | tail -12
timeout 25 python3 benchmarks/throughput.py --device cuda --dtype bf16 --attn sdpa --model llama-16m --pairs 128 --rounds 1 \
  --warmup-rounds 1 --out "$OUT/throughput_llama16m_cuda.json" 2>&1 | grep -v -E "Warning|warn" | tail -10
# 3. a short bf16 training run end to end (step-0 check, the self-check's choice in the log)
timeout 60 python3 -m dpokit train configs/tiny.yaml --set output.dir=/tmp/run_bf16 --set train.precision=bf16 \
  --set eval.max_new_tokens=16 > "$OUT/train_bf16.log" 2>&1; echo "bf16 train rc=$?" | tee -a "$OUT/gpu.txt"
cp /tmp/run_bf16/eval.json "$OUT/eval_bf16.json" 2>/dev/null; cp /tmp/run_bf16/train_summary.json "$OUT/" 2>/dev/null
grep -E "train.attention|step-0|falling back" "$OUT/train_bf16.log" | tail -5; tail -3 "$OUT/train_bf16.log"
bash benchmarks/zero_check.sh   # issue 20: DeepSpeed ZeRO-2/3 on one GPU and the ZeRO-3 full-weight save (needs .whl_ds/)
