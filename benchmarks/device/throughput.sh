#!/bin/bash
# End to end (model.generate) and the quantizer backends' throughput on the GPU machine.
# Usage: OUT=dir bash benchmarks/device/throughput.sh [tag]
set -o pipefail
TAG=${1:-h100}
{
nvidia-smi --query-gpu=name --format=csv,noheader
python3 benchmarks/bench_hf_cuda.py --batch 8 --reps 2 --new 128 --out $OUT
python3 benchmarks/bench_gpu.py --backends cupy torch --rotations hadamard --deadline 240 \
    --stem gpu_throughput_cupy_vs_torch_$TAG --out $OUT
} 2>&1 | tee $OUT/throughput_$TAG.log
mv $OUT/hf_cuda_decode_b8.md $OUT/hf_cuda_decode_b8_$TAG.md 2>/dev/null
mv $OUT/hf_cuda_decode_b8.json $OUT/hf_cuda_decode_b8_$TAG.json 2>/dev/null
