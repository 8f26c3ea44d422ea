#!/bin/bash
# End to end at batch 8 (32K prompt, 128 new tokens) with the host profile, on the GPU machine.
# Usage: OUT=dir bash benchmarks/device/e2e_b8.sh [tag]
set -o pipefail
TAG=${1:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o "H[0-9]*" | tr H h)}
{
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python3 benchmarks/bench_hf_cuda.py --batch 8 --reps 3 --new 128 --host-profile --graphs --out $OUT
mv $OUT/hf_cuda_decode_b8.md $OUT/hf_cuda_decode_b8_$TAG.md
mv $OUT/hf_cuda_decode_b8.json $OUT/hf_cuda_decode_b8_$TAG.json
} 2>&1 | grep -v "FutureWarning\|return fn" | tee $OUT/e2e_b8_$TAG.log
