#!/usr/bin/env bash
# Device call 1: stage organamnist_28.h5 on the machine (the four stores are over one call's 64 MiB),
# then the GPU benchmark again (data-pipeline share after mm-PT stopped reading its loss every step).
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=$PWD
mkdir -p /tmp/st && cp .device/stage1/organamnist_28.h5 /tmp/st/ && ls -la /tmp/st
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 110 python3 benchmarks/gpu.py --keep-going --json $OUT/gpu.json > $OUT/gpu.txt 2>&1; echo gpu_rc=$?
grep -v $'\r' $OUT/gpu.txt | cut -c1-200 | tail -40
