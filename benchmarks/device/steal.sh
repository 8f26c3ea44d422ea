#!/bin/bash
# Work stealing in tq_split_mmt (2026-12-06): GPU decode tests, the batch-8 phase timeline,
# and the schedules timed side by side as compile-time variants (the default; stealing
# without the interleaved block order; the fixed schedule), then the segment size.
# Usage: OUT=dir bash benchmarks/device/steal.sh [tag]
set -o pipefail
TAG=${1:-h100}
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m pytest -m gpu -q -x tests/test_decode_kernel.py tests/test_hf_fused_cuda.py 2>&1 \
    | tee $OUT/gpu_pytest_decode_$TAG.log | tail -2
python3 benchmarks/probe_decode_latency.py --out $OUT --trace --batch 8 --impls auto \
    --presets K4/V4,K3/V2 --trace-cases 128:32768,128:131072 --stem decode_trace_b8_steal_$TAG 2>&1 \
    | tee $OUT/trace_b8_steal_$TAG.log | grep -v "^   "
python3 benchmarks/bench_decode.py --out $OUT --timing --impls auto --extra-impls "" --presets K4/V4,K3/V2 \
    --contexts 4096,32768,131072 --batches 1,8,32 \
    --variants "new=;steal_only=-DTQ_SPLIT_INTERLEAVE=0;fixed=-DTQ_STEAL=0 -DTQ_SPLIT_INTERLEAVE=0" \
    --stem decode_steal_variants_$TAG 2>&1 | tail -3
python3 benchmarks/bench_decode.py --out $OUT --timing --impls auto --extra-impls "" --presets K4/V4,K3/V2 \
    --contexts 32768,131072 --batches 1,8,32 \
    --variants "seg4=;seg8=-DTQ_SEG_TILES=8;seg16=-DTQ_SEG_TILES=16" --stem decode_seg_variants_$TAG 2>&1 | tail -3
