#!/bin/bash
# GPU tests of the decode kernels and the fused HF cache, the host cost per call of a decode
# step's cache work, then end to end at batch 1 (with the host profile), on the GPU machine.
# Batch 8 is its own call (benchmarks/device/e2e_b8.sh): together they exceed one call's limit.
# Usage: OUT=dir bash benchmarks/device/host_e2e.sh [tag]
set -o pipefail
TAG=${1:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o "H[0-9]*" | tr H h)}
{
nvidia-smi --query-gpu=name --format=csv,noheader
export HF_HUB_OFFLINE=1
python3 -m pytest -q -m gpu tests/test_decode_kernel.py tests/test_hf_fused_cuda.py -x 2>&1 | tail -15
python3 benchmarks/probe_host_path.py --out $OUT && mv $OUT/host_path.md $OUT/host_path_$TAG.md \
    && mv $OUT/host_path.json $OUT/host_path_$TAG.json
python3 benchmarks/bench_hf_cuda.py --batch 1 --reps 3 --new 128 --host-profile --graphs --out $OUT
mv $OUT/hf_cuda_decode_b1.md $OUT/hf_cuda_decode_b1_$TAG.md
mv $OUT/hf_cuda_decode_b1.json $OUT/hf_cuda_decode_b1_$TAG.json
} 2>&1 | grep -v "FutureWarning\|return fn" | tee $OUT/host_e2e_$TAG.log
