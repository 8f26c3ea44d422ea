"""Tile-shape sweep of torch-triton's decode and scores kernels (diagnostics, not a headline
benchmark): each variant is checked against the eager torch backend, then timed with CUDA events
(median of repeats) side by side with CuPy's kernel on the same packed rows.

    python benchmarks/device/triton_sweep.py [--n 4194304] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tq  # noqa: E402
from tq.backends import triton_backend as tb  # noqa: E402
from bench_gpu import events_time  # noqa: E402


def sub(parts, f):
    """Parts with f applied to each section."""
    return type(parts)(f(parts.codes), f(parts.norms), f(parts.qjl), f(parts.rnorms))


def timed(torch, fn, repeats=7):
    """Median ms per call (bench_gpu's CUDA-event timer)."""
    return events_time(torch, fn, repeats)[0] * 1e3


DECODE = [(64, 64, 8, 1), (64, 128, 8, 1), (128, 64, 8, 1), (64, 32, 4, 1), (64, 64, 4, 1), (128, 32, 8, 1),
          (64, 32, 8, 2)]
SCORES = [(128, 16, 8), (64, 16, 4), (256, 16, 8), (128, 16, 4), (64, 16, 8), (256, 16, 4)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1 << 22)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--configs", default="mse:2,mse:4,prod:2")
    ap.add_argument("--ncu", action="store_true", help="one call of each kernel, for ncu")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    args = ap.parse_args()
    import torch

    n, d, m = args.n, args.dim, args.queries
    x = torch.randn((n, d), device="cuda", dtype=torch.float16)
    q = torch.randn((m, d), device="cuda", dtype=torch.float32)
    tt, tref = tq.get_backend("torch-triton"), tq.get_backend("torch")
    cpb = tq.get_backend("cupy") if not args.ncu else None
    rows = []
    for spec in args.configs.split(","):
        kind, bits = spec.split(":")
        plan = tq.QuantizerConfig(d, int(bits), kind=kind, rotation="hadamard", seed=1).plan()
        parts = tt.encode(plan, x)
        if args.ncu:
            tt.decode(plan, parts), tb.decode(plan, parts, gluon=False), tt.scores(plan, q, parts), tb.scores(plan, q, parts, gluon=False)
            torch.cuda.synchronize()
            continue
        ref_dec = tref.decode(plan, sub(parts, lambda a: a[:4096]))
        ref_sc = tref.scores(plan, q, sub(parts, lambda a: a[:4096]))
        import cupy as cp

        cparts = sub(parts, cp.from_dlpack)
        qc = cp.from_dlpack(q)
        base = {"kind": kind, "bits": int(bits), "n": n,
                "cupy_decode_ms": timed(torch, lambda: cpb.decode(plan, cparts)),
                "cupy_scores_ms": timed(torch, lambda: cpb.scores(plan, qc, cparts))}
        saved = (tb.DECODE_ROWS, tb.DECODE_COLUMNS, tb.DECODE_WARPS, tb.SINGLE_STAGE,
                 tb.SCORE_ROWS, tb.SCORE_QUERIES, tb.SCORE_WARPS)
        if tb.gluon_decode_applies(plan, parts):
            err = float(((tb.decode(plan, parts)[:4096] - ref_dec).abs().max() / ref_dec.abs().max()))
            rows.append({**base, "op": "decode", "tile": "gluon", "ms": timed(torch, lambda: tb.decode(plan, parts)),
                         "rel_err": err})
            print(json.dumps(rows[-1]), flush=True)
        for r, nb, w, st in DECODE:
            tb.DECODE_ROWS, tb.DECODE_COLUMNS, tb.DECODE_WARPS, tb.SINGLE_STAGE = r, nb, w, {"num_stages": st}
            try:
                err = float(((tb.decode(plan, parts, gluon=False)[:4096] - ref_dec).abs().max() / ref_dec.abs().max()))
                ms = timed(torch, lambda: tb.decode(plan, parts, gluon=False))
            except Exception as e:  # noqa: BLE001 - a tile that does not compile is a result
                err, ms = None, f"{type(e).__name__}: {str(e)[:120]}"
            rows.append({**base, "op": "decode", "tile": [r, nb, w, st], "ms": ms, "rel_err": err})
            print(json.dumps(rows[-1]), flush=True)
        (tb.DECODE_ROWS, tb.DECODE_COLUMNS, tb.DECODE_WARPS, tb.SINGLE_STAGE) = saved[:4]
        if tb.gluon_scores_applies(plan, parts):
            err = float(((tb.scores(plan, q, parts)[:, :4096] - ref_sc).abs().max() / ref_sc.abs().max()))
            rows.append({**base, "op": "scores", "tile": "gluon", "ms": timed(torch, lambda: tb.scores(plan, q, parts)),
                         "rel_err": err})
            print(json.dumps(rows[-1]), flush=True)
        for bn, bm, w in SCORES:
            tb.SCORE_ROWS, tb.SCORE_QUERIES, tb.SCORE_WARPS = bn, bm, w
            try:
                err = float(((tb.scores(plan, q, parts, gluon=False)[:, :4096] - ref_sc).abs().max() / ref_sc.abs().max()))
                ms = timed(torch, lambda: tb.scores(plan, q, parts, gluon=False))
            except Exception as e:  # noqa: BLE001
                err, ms = None, f"{type(e).__name__}: {str(e)[:120]}"
            rows.append({**base, "op": "scores", "tile": [bn, bm, w], "ms": ms, "rel_err": err})
            print(json.dumps(rows[-1]), flush=True)
        tb.SCORE_ROWS, tb.SCORE_QUERIES, tb.SCORE_WARPS = saved[4:]
    if not args.ncu:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv),
               "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        (out / "triton_sweep.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
