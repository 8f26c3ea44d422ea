#!/usr/bin/env bash
# Diagnostics for torch-triton's decode and scores kernels: a tile sweep next to CuPy, then ncu
# on one decode and one scores launch of each config.
# Usage (device machine, repository root): OUT=dir bash benchmarks/device/triton_sweep.sh
set -u
out=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
timeout 300 python benchmarks/device/triton_sweep.py --out "$out" 2>&1 | tee "$out/triton_sweep.log"
timeout 200 ncu --clock-control none -k regex:'decode_kernel|decode_gluon|scores_kernel|scores_gluon' -c 12 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
    --section WarpStateStats --section SchedulerStats \
    python benchmarks/device/triton_sweep.py --ncu --n 1048576 > "$out/triton_sweep_ncu.txt" 2>&1
tail -5 "$out/triton_sweep_ncu.txt"
timeout 200 python -m pytest -q -m gpu tests/test_gpu_backends.py -k triton -p no:cacheprovider \
    2>&1 | tee "$out/gpu_pytest_triton_sweep.log" | tail -8
