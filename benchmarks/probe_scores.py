"""Inner products from packed codes, a few calls of one configuration: the target for a profiler.

    ncu -k regex:tqq_scores_mma --launch-skip 1 --launch-count 1 --section SpeedOfLight \
        python benchmarks/probe_scores.py 4 mse        # bits, kind [, n, queries]

2**24 vectors of d = 128 (float16 input), 16 queries by default, CuPy backend.  Results of
such runs: benchmarks/results/ncu_scores_mma_h200_*.txt.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tq  # noqa: E402


def main() -> None:
    import cupy as cp

    bits, kind = int(sys.argv[1]), sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 1 << 24
    m = int(sys.argv[4]) if len(sys.argv) > 4 else 16
    d = 128
    x = cp.random.standard_normal((n, d), dtype=cp.float32).astype(cp.float16)
    q = tq.Quantizer(d, bits, kind=kind, backend="cupy")
    c = q.compress(x)
    y = cp.random.standard_normal((m, d), dtype=cp.float32)
    for _ in range(3):
        q.inner_product(y, c)
    cp.cuda.Device().synchronize()


if __name__ == "__main__":
    main()
