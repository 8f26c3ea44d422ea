#!/bin/bash
# Batch 1 on the GPU machine: the decode GPU tests, then forced splits with the
# work-stealing and the fixed schedule side by side (does a one-wave grid of more
# than two blocks per SM pay at batch 1 once warps steal?).
# Usage: OUT=dir bash benchmarks/device/b1_sweep.sh [tag]
set -o pipefail
TAG=${1:-h100}
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m pytest -m gpu -q tests/test_decode_kernel.py tests/test_hf_fused_cuda.py 2>&1 \
    | tee $OUT/gpu_pytest_decode_$TAG.log | tail -2
python3 benchmarks/probe_decode_latency.py --out $OUT --windows 128 --batch 1 --impls auto,mmt \
    --presets K4/V4,K3/V2 --contexts 32768,131072 --forced-at 32768,131072 \
    --splits 24,32,40,48,56,64,96 --schedules steal,fixed --stem decode_b1_splits_steal_$TAG 2>&1 \
    | tee $OUT/probe_b1_splits_steal_$TAG.log
