#!/bin/bash
# Phase timelines of single decode launches (kernels built with -DTQ_TRACE) at batch 8 and 1,
# then the GPU backend property tests.  Usage: OUT=dir bash benchmarks/device/trace.sh [tag]
set -o pipefail
TAG=${1:-h100}
nvidia-smi --query-gpu=name --format=csv,noheader
for B in 8 1; do
python3 benchmarks/probe_decode_latency.py --out $OUT --trace --batch $B --impls auto \
    --presets K4/V4,K3/V2 --trace-cases 128:4096,128:32768,128:131072 --stem decode_trace_b${B}_$TAG 2>&1 \
    | tee $OUT/trace_b${B}_$TAG.log
done
python3 -m pytest -m gpu -q tests/test_gpu_backends.py 2>&1 | tee $OUT/gpu_pytest_backends_$TAG.log | tail -3
