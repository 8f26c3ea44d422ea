#!/usr/bin/env bash
# torch-triton's fused encode on the GPU: throughput side by side with CuPy, then the GPU tests.
# Usage (device machine, repository root): OUT=dir bash benchmarks/device/triton_encode.sh [tag]
set -u
tag=${1:-h100}
out=${OUT:-benchmarks/results}
export HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
python -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"
timeout 330 python benchmarks/bench_gpu.py --backends cupy torch-triton --rotations hadamard \
    --kinds mse prod --bits 2 3 4 --deadline 240 --out "$out" --stem "gpu_throughput_cupy_vs_torch_triton_$tag" \
    2>&1 | tee "$out/gpu_throughput_cupy_vs_torch_triton_$tag.log"
timeout 240 python -m pytest -q -m gpu tests/test_gpu_backends.py -k triton -p no:cacheprovider \
    2>&1 | tee "$out/gpu_pytest_triton_$tag.log" | tail -15
