#!/bin/bash
# One call: the decode / fused-cache / graph GPU tests, then end to end at batch 1 and batch 8
# (eager and CUDA-graph replays, host profile at batch 1), then the host path probe, on the GPU machine.
# Usage: OUT=dir [PARTS="tests b1 b8 host"] bash benchmarks/device/all_e2e.sh [tag]
# PARTS may also name "alltests": every GPU test (pytest -m gpu tests/), instead of the subset.
set -o pipefail
TAG=${1:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o "H[0-9][0-9]*" | head -1 | tr H h)}
PARTS=${PARTS:-"tests b1 b8 host"}
has() { [[ " $PARTS " == *" $1 "* ]]; }
{
nvidia-smi --query-gpu=name --format=csv,noheader
export HF_HUB_OFFLINE=1
if has tests; then
python3 -m pytest -q -m gpu tests/test_hf_fused_cuda.py tests/test_decode_kernel.py -k "graph or token_by_token or fused or stealing or matches_reference" 2>&1 | tail -15
fi
if has alltests; then
python3 -m pytest -q -m gpu tests/ 2>&1 | tail -15
fi
if has b1; then
python3 benchmarks/bench_hf_cuda.py --batch 1 --reps 3 --new 128 --host-profile --graphs --out $OUT
mv $OUT/hf_cuda_decode_b1.md $OUT/hf_cuda_decode_b1_$TAG.md; mv $OUT/hf_cuda_decode_b1.json $OUT/hf_cuda_decode_b1_$TAG.json
fi
if has b8; then
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    python3 benchmarks/bench_hf_cuda.py --batch 8 --reps 2 --new 128 --graphs --out $OUT
mv $OUT/hf_cuda_decode_b8.md $OUT/hf_cuda_decode_b8_$TAG.md; mv $OUT/hf_cuda_decode_b8.json $OUT/hf_cuda_decode_b8_$TAG.json
fi
if has host; then
python3 benchmarks/probe_host_path.py --out $OUT && mv $OUT/host_path.md $OUT/host_path_$TAG.md \
    && mv $OUT/host_path.json $OUT/host_path_$TAG.json
fi
} 2>&1 | grep -v "FutureWarning\|return fn\|attention mask" | tee $OUT/all_e2e_$TAG.log
