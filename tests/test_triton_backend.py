"""The torch-triton backend's plain Triton encode kernel, run by Triton's interpreter on the CPU.

The interpreter executes the same kernel source (tq/backends/triton_kernels.py) with NumPy,
one IEEE float32 operation at a time, so the bytes must equal the NumPy reference's for
every hadamard configuration the kernel takes.  It runs in a subprocess because
``TRITON_INTERPRET`` is read when the kernels are defined.  The Gluon kernel (CUDA only) and
the kernels compiled for a GPU are checked by tests/test_gpu_backends.py on the device.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

SCRIPT = r"""
import json, sys
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
import tq
from tq.backends import triton_backend as trb
from test_torch_backend import make_input
out = []
cases = [(128, 3, "mse", False), (128, 2, "prod", False), (100, 4, "mse", True), (64, 1, "prod", True),
         (128, 4, "prod", True), (96, 3, "prod", False), (16, 2, "mse", False), (256, 3, "prod", False),
         (33, 1, "prod", False), (20, 1, "mse", True)]
scales = ["unit", "tiny", "huge", "subnormal", "mixed", "zeros", "one_hot"]
for i, (dim, bits, kind, nc) in enumerate(cases):
    plan = tq.QuantizerConfig(dim, bits, kind=kind, seed=3 + i, norm_correction=nc).plan()
    rng = np.random.default_rng(i)
    x = make_input(rng, 45, dim, scales[i % len(scales)], "float32").astype(np.float32)
    with np.errstate(all="ignore"):
        want = tq.get_backend("numpy").encode(plan, x)
        got = trb.encode(plan, torch.from_numpy(x))
    diff = {k: int((np.asarray(getattr(want, k)).view(np.uint8) != getattr(got, k).numpy().view(np.uint8)).sum())
            for k in ("codes", "norms", "qjl", "rnorms")}
    out.append({"case": [dim, plan.config.bits, kind, nc], "scale": scales[i % len(scales)],
                "applies": trb.applies(plan, torch.from_numpy(x)), "diff": diff})
print(json.dumps(out))
"""


def test_plain_triton_encode_is_the_reference_under_the_interpreter():
    here = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(here)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == 10 and all(r["applies"] for r in results), results
    bad = [r for r in results if any(r["diff"].values())]
    assert not bad, bad
