#!/usr/bin/env bash
# The wheels the GPU image lacks, for its Python 3.12 on x86-64, fetched where PyPI is reachable (the GPU machine
# has no network): the image has torch 2.11.0, transformers 5.17.0 and accelerate 1.15.0, and no trl, datasets or
# pydantic (issue 32). Versions are pinned to this project's tested set.
#   bash benchmarks/gpu_wheels.sh      # writes .whl/ (required), .whl_pa/ (pyarrow), .whl_ds/ (DeepSpeed) and sizes
# .whl_pa/ is installed by gpu_check.sh only where the image's pyarrow is older than 24; .whl_ds/ by zero_check.sh.
# DeepSpeed publishes no wheel on PyPI: its source is built here into a pure-Python wheel (no ops compiled; they
# build at run time) with `pip wheel --no-deps --no-build-isolation`, which needs torch installed here.
# The wheel folders are git-ignored and travel only when a device command names them in `carry`, all within 64 MiB
# with the working tree (1.6 MB): gpu_check.sh carries .whl and .whl_pa (pyarrow's wheel alone is about 52 MiB),
# zero_check.sh .whl and .whl_ds. The script fails when either set exceeds LIMIT_MIB (default 60).
set -euo pipefail
LIMIT_MIB=${LIMIT_MIB:-60}
TARGET=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
# trl and datasets, pydantic, and what they need that torch/transformers/accelerate do not bring.
REQUIRED=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0
          pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2)
PYARROW=(pyarrow==26.0.1)
DEEPSPEED=deepspeed==0.19.8
DEEPSPEED_DEPS=(einops hjson msgpack ninja py-cpuinfo)
rm -rf .whl .whl_pa .whl_ds && mkdir -p .whl .whl_pa .whl_ds
python3 -m pip download -q "${TARGET[@]}" -d .whl "${REQUIRED[@]}"
python3 -m pip download -q "${TARGET[@]}" -d .whl_pa "${PYARROW[@]}"
if python3 -m pip download -q --no-deps --no-binary=:all: -d /tmp/deepspeed_src "$DEEPSPEED" \
   && python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl_ds /tmp/deepspeed_src/deepspeed-*.tar.gz; then
  python3 -m pip download -q "${TARGET[@]}" -d .whl_ds "${DEEPSPEED_DEPS[@]}"
else
  echo "deepspeed: could not build a wheel here (zero_check.sh will skip)"; rm -rf .whl_ds/*
fi
du -b -c .whl/*.whl .whl_pa/*.whl .whl_ds/*.whl 2> /dev/null | awk '{printf "%10.1f MiB  %s\n", $1 / 2^20, $2}'
status=0
for set in ".whl .whl_pa" ".whl .whl_ds"; do  # gpu_check.sh's carry, zero_check.sh's carry
  total=$(du -b -c $set | tail -1 | cut -f1)
  echo "carry [$set]: $(( total / 2**20 )) MiB (limit $LIMIT_MIB MiB)"
  (( total <= LIMIT_MIB * 2**20 )) || { echo "  over the limit (the working tree travels in 64 MiB)"; status=1; }
done
exit $status
