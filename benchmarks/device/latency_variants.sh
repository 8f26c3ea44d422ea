#!/bin/bash
# Prologue and finish latency (2026-12-06): the query/sign prefetch (TQ_QPREFETCH=2) and the
# staged finish (TQ_FINISH_STAGE=1) together, timed side by side with the default at batch 1
# (32K, 128K), then the bit-equality test of the variants (d = 128).
# Measured neutral and removed again: apply benchmarks/results/decode_qprefetch_finish_stage_negative.patch
# (git apply) to rerun.  Usage: OUT=dir bash benchmarks/device/latency_variants.sh [tag]
set -o pipefail
TAG=${1:-h100}
nvidia-smi --query-gpu=name --format=csv,noheader
V="base=;qp2fs=-DTQ_QPREFETCH=2 -DTQ_FINISH_STAGE=1"
python3 benchmarks/bench_decode.py --out $OUT --timing --impls auto --extra-impls "" --presets K4/V4,K3/V2 \
    --contexts 32768,131072 --batches 1 --variants "$V" --stem decode_latency_variants_b1_$TAG 2>&1 \
    | grep -E "K./V.* \[|SDPA" | tee $OUT/latency_variants_$TAG.log
timeout 120 python3 -m pytest -m gpu -q tests/test_decode_kernel.py -k "many_splits and 128" 2>&1 \
    | tee $OUT/gpu_pytest_decode_variants_$TAG.log | tail -2
