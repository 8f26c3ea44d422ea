"""The torch-triton backend's kernels, run by Triton's interpreter on the CPU.

tests/triton_interpreted.py holds the property tests (encode bytes against the reference for
the plain Triton and the Gluon kernel, decode and scores within float32 tolerance).  They run
here in a subprocess because ``TRITON_INTERPRET`` is read when the kernels are defined; the
compiled kernels are checked by tests/test_gpu_backends.py on a GPU.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")


def test_triton_kernels_under_the_interpreter():
    here = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                          str(here / "triton_interpreted.py")],
                         cwd=here, env=env, capture_output=True, text=True, timeout=900)
    tail = run.stdout[-4000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    counts = re.search(r"(\d+) passed", run.stdout)
    assert counts and int(counts.group(1)) == 5 and "skipped" not in run.stdout, tail
