#!/bin/bash
# Prologue and finish latency (2026-12-06): the query/sign prefetch (TQ_QPREFETCH) and the
# staged finish (TQ_FINISH_STAGE) as compile-time variants timed side by side, then the
# decode GPU tests with both switched on (among them the bit-equality test of the variants).
# Usage: OUT=dir bash benchmarks/device/latency_variants.sh [tag]
set -o pipefail
TAG=${1:-h100}
nvidia-smi --query-gpu=name --format=csv,noheader
python3 benchmarks/bench_decode.py --out $OUT --timing --impls auto --extra-impls "" --presets K4/V4,K3/V2 \
    --contexts 4096,32768,131072 --batches 1,8 \
    --variants "base=;qp2=-DTQ_QPREFETCH=2;fs=-DTQ_FINISH_STAGE=1;qp2fs=-DTQ_QPREFETCH=2 -DTQ_FINISH_STAGE=1" \
    --stem decode_latency_variants_$TAG 2>&1 | grep -v "^ *$" | tail -60
TQ_DECODE_DEFINES="-DTQ_QPREFETCH=2 -DTQ_FINISH_STAGE=1" python3 -m pytest -m gpu -q \
    tests/test_decode_kernel.py tests/test_hf_fused_cuda.py 2>&1 | tee $OUT/gpu_pytest_decode_qp2_fs_$TAG.log | tail -2
