"""Can torch.compile give the torch backend's MSE compress fused kernels with the reference's
bytes?  A probe for issue 3's "torch within 3x of CuPy" target (docs/GPU_BACKENDS.md).

Compiles tq.backends.torch_backend._encode_chunk (hadamard rotation, MSE kind) with inductor,
FMA contraction off in the generated Triton (TRITON_DEFAULT_FP_FUSION=0, set before triton is
imported), checks the packed bytes and norms against the eager torch backend (itself
byte-identical to the NumPy reference, tests/test_gpu_backends.py), and times eager, compiled
and (on CUDA, when installed) the CuPy kernel side by side: CUDA events, median of repeats.

    python benchmarks/probe_torch_compile.py --n 4194304 --bits 2,4 --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import tq  # noqa: E402
from tq.backends import torch_backend as TB  # noqa: E402

from _common import environment  # noqa: E402


def timed(fn, reps, cuda):
    ts = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1 << 22)
    ap.add_argument("--bits", default="2,4")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    d = 128
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn((a.n, d), generator=g, device=dev, dtype=torch.float32).to(torch.float16)
    x[0] = 0                       # a zero vector
    x[1] *= 300                    # a huge norm
    rows = []
    for bits in map(int, a.bits.split(",")):
        q = tq.Quantizer(d, bits, kind="mse", rotation="hadamard", backend="torch")
        plan = q.plan
        prm = TB._params(plan, x.device)

        def chunk(xc, codes, norms, plan=plan, prm=prm, bits=bits):
            TB._encode_chunk(plan, prm, xc, bits, codes, norms, None, None)

        compiled = torch.compile(chunk, dynamic=False, fullgraph=False)
        ref = TB.encode(plan, x)
        codes = torch.empty_like(ref.codes)
        norms = torch.empty_like(ref.norms)
        step = max(1, TB._CHUNK_ELEMS // plan.padded_dim)

        def run_compiled():
            for lo in range(0, a.n, step):
                hi = min(a.n, lo + step)
                compiled(x[lo:hi], codes[lo:hi], norms[lo:hi])

        t0 = time.perf_counter()
        run_compiled()
        if cuda:
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        same_codes = bool(torch.equal(codes, ref.codes))
        same_norms = bool(torch.equal(norms.view(torch.int16), ref.norms.view(torch.int16)))
        ndiff = int((codes != ref.codes).any(dim=1).sum())
        row = dict(bits=bits, n=a.n, device=torch.cuda.get_device_name(0) if cuda else "cpu",
                   compile_s=compile_s, codes_equal=same_codes, norms_equal=same_norms, rows_differing=ndiff,
                   eager_ms=timed(lambda: TB.encode(plan, x), a.reps, cuda), compiled_ms=timed(run_compiled, a.reps, cuda))
        if cuda:
            try:
                import cupy
                qc = tq.Quantizer(d, bits, kind="mse", rotation="hadamard", backend="cupy")
                cc = qc.compress(x)
                row["cupy_codes_equal"] = bool((cupy.asarray(cc.parts.codes) == cupy.asarray(ref.codes)).all())
                row["cupy_ms"] = timed(lambda: qc.compress(x), a.reps, cuda)
            except Exception as e:  # CuPy missing or failing: the torch columns still stand
                row["cupy_error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        env = environment(("torch", "triton", "cupy"))
        env["gpu"] = torch.cuda.get_device_name(0) if cuda else None
        env["triton_fp_fusion"] = os.environ.get("TRITON_DEFAULT_FP_FUSION")
        stem = os.path.join(a.out, "torch_compile_probe_" + ("gpu" if cuda else "cpu"))
        with open(stem + ".json", "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1)
        lines = ["# torch.compile probe of the torch backend's MSE compress (hadamard, d = 128, float16 in)", ""]
        lines += [f"- {k}: {v}" for k, v in env.items()] + ["",
                  "| bits | n | device | compiled = eager (codes / norms) | rows differing | CuPy codes = eager | "
                  "eager ms | compiled ms | CuPy ms | compile s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['bits']} | {r['n']} | {r['device']} | {r['codes_equal']} / {r['norms_equal']} | "
                         f"{r['rows_differing']} | {r.get('cupy_codes_equal', '-')} | {r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | "
                         f"{r.get('cupy_ms', float('nan')):.2f} | {r['compile_s']:.1f} |")
        with open(stem + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
