#!/bin/bash
# End to end (model.generate, 8 layers of the Llama-3-8B shape, 32K prompt) at batch 1 and 8,
# with the host-time breakdown of a decode step, on the GPU machine.
# Usage: OUT=dir bash benchmarks/device/e2e.sh [tag]
set -o pipefail
TAG=${1:-h100}
{
nvidia-smi --query-gpu=name --format=csv,noheader
for B in 1 8; do
    python3 benchmarks/bench_hf_cuda.py --batch $B --reps 3 --new 128 --host-profile --out $OUT
    mv $OUT/hf_cuda_decode_b$B.md $OUT/hf_cuda_decode_b${B}_$TAG.md
    mv $OUT/hf_cuda_decode_b$B.json $OUT/hf_cuda_decode_b${B}_$TAG.json
done
} 2>&1 | grep -v "FutureWarning\|return fn" | tee $OUT/e2e_$TAG.log
