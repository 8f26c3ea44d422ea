#!/bin/bash
# The decode kernel's table, its correctness check and its GPU tests on the GPU machine.
# Usage: OUT=dir bash benchmarks/device/decode_table.sh [tag]
set -o pipefail
TAG=${1:-h100}
nvidia-smi --query-gpu=name --format=csv,noheader
# mma against mmt where impl="auto" now takes mmt with the byte-permute tables (short contexts)
python3 benchmarks/probe_decode_latency.py --out $OUT --windows 128 --batch 8 --impls auto,mma,mmt \
    --presets K4/V4,K3/V2 --contexts 1024,4096,8192,32768,131072 --no-forced --stem decode_b8_short_impls_$TAG 2>&1 \
    | tee $OUT/probe_short_$TAG.log
python3 benchmarks/probe_decode_latency.py --out $OUT --windows 128 --batch 1 --impls auto,mma,mmt \
    --presets K4/V4 --contexts 512,1024,2048 --no-forced --stem decode_b1_short_impls_$TAG 2>&1 \
    | tee -a $OUT/probe_short_$TAG.log
python3 benchmarks/bench_decode.py --out $OUT --timing --check --quick --impls auto --extra-impls "" \
    --stem decode_kernel_$TAG 2>&1 | tail -5
python3 -m pytest -m gpu -q tests/test_decode_kernel.py tests/test_hf_fused_cuda.py 2>&1 \
    | tee $OUT/gpu_pytest_decode_$TAG.log | tail -3
