#!/bin/bash
# Planner sweep on the GPU machine: forced splits at batch 8 and 32, and the
# mma/mmt choice at batch 1.  Usage: OUT=dir bash benchmarks/device/splits_sweep.sh [tag]
set -o pipefail
TAG=${1:-h100}
P="python3 benchmarks/probe_decode_latency.py --out $OUT --windows 128"
{
nvidia-smi --query-gpu=name --format=csv,noheader
$P --batch 8 --impls auto --presets K4/V4,K3/V2 --contexts 4096,32768,131072 \
   --forced-at 32768,131072 --splits 4,6,8,12,16,24,32 --stem decode_b8_splits_$TAG
$P --batch 32 --impls auto --presets K4/V4,K3/V2 --contexts 4096,32768,131072 \
   --forced-at 32768,131072 --splits 1,2,3,4,6,8,12 --stem decode_b32_splits_$TAG
$P --batch 1 --impls mma,mmt --presets K4/V4,K3/V2 \
   --contexts 4096,8192,16384,32768,65536,131072 --no-forced --stem decode_b1_impls_$TAG
} 2>&1 | tee $OUT/probe_splits_$TAG.log
