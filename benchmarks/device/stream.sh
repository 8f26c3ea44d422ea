#!/bin/bash
# Decode attention as a model's decode step runs it (layers back to back in one CUDA graph),
# beside the per-call times, then end to end at batch 1, on the GPU machine.
# Usage: OUT=dir bash benchmarks/device/stream.sh [tag]
set -o pipefail
TAG=${1:-h100}
{
nvidia-smi --query-gpu=name --format=csv,noheader
python3 benchmarks/bench_decode.py --out $OUT --stream --contexts 4096,32768,131072 --batches 1,8,32 \
    --presets K4/V4,K3/V3,K4/V2,K3/V2 --stem decode_stream_$TAG
python3 benchmarks/bench_hf_cuda.py --batch 1 --reps 2 --new 128 --out $OUT
} 2>&1 | tee $OUT/stream_$TAG.log
mv $OUT/hf_cuda_decode_b1.md $OUT/hf_cuda_decode_b1_$TAG.md 2>/dev/null
mv $OUT/hf_cuda_decode_b1.json $OUT/hf_cuda_decode_b1_$TAG.json 2>/dev/null
ls $OUT
