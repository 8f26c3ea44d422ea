#!/bin/bash
# Prologue and finish latency (2026-12-06): the query/sign prefetch (TQ_QPREFETCH) and the
# staged finish (TQ_FINISH_STAGE) as compile-time variants timed side by side (batch 1 at
# 4K-128K, batch 8 at 32K), then the bit-equality test of the variants and the reference
# tests with both switched on.  Usage: OUT=dir bash benchmarks/device/latency_variants.sh [tag]
set -o pipefail
TAG=${1:-h100}
nvidia-smi --query-gpu=name --format=csv,noheader
V="base=;qp2=-DTQ_QPREFETCH=2;fs=-DTQ_FINISH_STAGE=1;qp2fs=-DTQ_QPREFETCH=2 -DTQ_FINISH_STAGE=1"
python3 benchmarks/bench_decode.py --out $OUT --timing --impls auto --extra-impls "" --presets K4/V4,K3/V2 \
    --contexts 4096,32768,131072 --batches 1 --variants "$V" --stem decode_latency_variants_b1_$TAG 2>&1 \
    | grep -E "K./V.* \[|SDPA" | tee $OUT/latency_variants_$TAG.log
python3 benchmarks/bench_decode.py --out $OUT --timing --impls auto --extra-impls "" --presets K4/V4,K3/V2 \
    --contexts 32768 --batches 8 --variants "$V" --stem decode_latency_variants_b8_$TAG 2>&1 \
    | grep -E "K./V.* \[|SDPA" | tee -a $OUT/latency_variants_$TAG.log
TQ_DECODE_DEFINES="-DTQ_QPREFETCH=2 -DTQ_FINISH_STAGE=1" timeout 150 python3 -m pytest -m gpu -q \
    tests/test_decode_kernel.py -k "many_splits or matches_reference or head_dims" 2>&1 \
    | tee $OUT/gpu_pytest_decode_qp2_fs_$TAG.log | tail -2
