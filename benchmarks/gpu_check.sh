#!/usr/bin/env bash
# One prepared GPU command (docs/gpu-engine.md): installs the carried wheels, runs the engine benchmark
# (benchmarks/gpu.py: both shapes, TRL vs each dpokit backend, one JSON per shape), the throughput benchmark on CUDA
# in bf16 (SmolLM2-135M-shaped LLaMA and 16M LLaMA) and a short bf16 training run end to end.
#   bash benchmarks/gpu_check.sh                 # on the device machine (carry .whl and .whl_pa); results under $OUT
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh   # CPU smoke mode: the same steps, tiny and on the CPU
# Budget: on the GPU the timeouts sum to 370 s (installs 2 x 40, gpu.py 180, throughput 40 + 25, training 45), so
# one 10-minute command holds it with room for a rerun in a 15-minute device lease; the smoke mode's CPU timeouts
# sum to 470 s (the throughput and training steps get longer ones on a shared CPU). At most 8 files under $OUT. DeepSpeed ZeRO is a separate command
# (benchmarks/zero_check.sh). Wheels: benchmarks/gpu_wheels.sh builds .whl/ (required), .whl_pa/ (pyarrow, only if
# the image's is older than 24) and .whl_ds/ (DeepSpeed); an optional install that fails is reported, not fatal.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SMOKE=${GPU_CHECK_SMOKE:-0}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DPOKIT_CACHE=${DPOKIT_CACHE:-/tmp/dpokit-cache}
START=$(date +%s)
note() { echo "$*" | tee -a "$OUT/gpu.txt"; }
quiet() { grep -v -E "Warning|warn" | tail -"$1"; }
install() {  # install DIR [optional]: pip --target /tmp/site from carried wheels; no network
  if ! ls "$1"/*.whl > /dev/null 2>&1; then note "install: no wheels in $1/ (skipped)"; return 0; fi
  timeout 40 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$1"/*.whl \
    || note "install: $1 failed (rc=$?)${2:+, optional: continuing}"
}
install .whl
if ! python3 -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" 2> /dev/null; then
  install .whl_pa optional
fi
export PYTHONPATH=/tmp/site:$PWD/src
T_GPU=180; T_TRAIN=45; TP_MODELS="llama-135m:40 llama-16m:25"; TP_ARMS=trl,dpokit_packed,dpokit_packed_cached_ref
if [ "$SMOKE" = 1 ]; then
  T_TRAIN=90; TP_MODELS="dpokit-tiny-llama:120"; TP_ARMS=dpokit_packed,dpokit_packed_cached_ref
  DEVICE=cpu; GPU_ARGS="--smoke --device cpu"; TP_ARGS="--device cpu --dtype fp32 --pairs 4 --rounds 1 --warmup-rounds 0"
  PRECISION=fp32; EVAL=false; note "smoke mode: CPU $(lscpu | grep 'Model name' | sed 's/.*: *//')"
else
  DEVICE=cuda; GPU_ARGS="--steps 8 --warmup 2"; TP_ARGS="--device cuda --dtype bf16 --pairs 64 --rounds 1 --warmup-rounds 1"
  PRECISION=bf16; EVAL=true; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/gpu.txt"
fi
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
# 1. the engine benchmark, both shapes (smoke: the tiny one): gpu_<shape>_<device>.json
timeout $T_GPU python3 benchmarks/gpu.py $GPU_ARGS --out-dir "$OUT" 2>&1 | quiet 30
note "gpu.py rc=${PIPESTATUS[0]}"
# 2. the throughput comparison, one timed round, to one JSON per model (smoke: the tiny LLaMA, dpokit arms)
T_TP=0
for model in $TP_MODELS; do  # name:timeout
  T_TP=$(( T_TP + ${model##*:} ))
  timeout "${model##*:}" python3 benchmarks/throughput.py $TP_ARGS --attn sdpa --model "${model%%:*}" \
    --arms $TP_ARMS --out "$OUT/throughput_${model%%:*}_$DEVICE.json" 2>&1 | quiet 6
  note "throughput ${model%%:*} rc=${PIPESTATUS[0]}"
done
# 3. a short training run end to end (step-0 check, the self-check's choice in the log)
timeout $T_TRAIN python3 -m dpokit train configs/tiny.yaml --overwrite --set output.dir=/tmp/run_check --set train.precision=$PRECISION \
  --set train.max_steps=6 --set eval.enabled=$EVAL --set eval.max_new_tokens=16 > "$OUT/train.log" 2>&1; note "train $PRECISION rc=$?"
cp /tmp/run_check/train_summary.json "$OUT/" 2>/dev/null
grep -E "train.layout|step-0|falling back" "$OUT/train.log" | tail -5 | tee -a "$OUT/gpu.txt"
BUDGET=$(( 80 + T_GPU + T_TP + T_TRAIN ))
note "gpu_check: $(( $(date +%s) - START )) s (budget $BUDGET s), $(find "$OUT" -type f | wc -l) files under \$OUT"
