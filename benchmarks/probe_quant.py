"""A few calls of one CuPy quantizer kernel in one configuration: the target for a profiler.

    ncu -k regex:tqq_scores_mma --launch-skip 1 --launch-count 1 --section SpeedOfLight \
        python benchmarks/probe_quant.py scores 4 mse      # op, bits, kind [, rotation, n, queries]
    ncu -k regex:tqq_encode --launch-skip 1 --launch-count 1 ... probe_quant.py compress 2 mse

op is compress, decompress or scores (inner products from packed codes).  2**24 vectors of
d = 128 (float16 input), hadamard rotation and 16 queries by default.  Results of such runs:
benchmarks/results/ncu_scores_mma_h200_*.txt, ncu_encode_h200_*.txt.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tq  # noqa: E402


def main() -> None:
    import cupy as cp

    op, bits, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    rotation = sys.argv[4] if len(sys.argv) > 4 else "hadamard"
    n = int(sys.argv[5]) if len(sys.argv) > 5 else 1 << 24
    m = int(sys.argv[6]) if len(sys.argv) > 6 else 16
    if op not in ("compress", "decompress", "scores"):
        raise SystemExit(f"op must be compress, decompress or scores, not {op!r}")
    d = 128
    x = cp.random.standard_normal((n, d), dtype=cp.float32).astype(cp.float16)
    q = tq.Quantizer(d, bits, kind=kind, rotation=rotation, backend="cupy")
    c = q.compress(x)
    y = cp.random.standard_normal((m, d), dtype=cp.float32)
    for _ in range(3):
        if op == "compress":
            q.compress(x)
        elif op == "decompress":
            q.decompress(c)
        else:
            q.inner_product(y, c)
    cp.cuda.Device().synchronize()


if __name__ == "__main__":
    main()
