"""CuPy prod compress: the QJL projection on tensor cores against the exact sequential one.

For n rows (default 2**24) of dim 128 in float16 (fresh random data), bits 2, 3, 4, the
fast encoder is built twice, with TQ_CUPY_QJL=mma (the default) and =exact, and timed
side by side (CUDA events, the two interleaved, median of repeats), with the MSE compress
of the same bits as a yardstick.  Correctness first, on check rows spread over the batch:
codes, norms and residual norms must equal the NumPy reference's bytes under both; the
exact build's QJL signs must too; the tensor-core build's signs may differ only where the
exact float64 projection of the reference's residual is within FORMAT.md section 5's bound
of zero (g = max(2^-16, 2^-23 P) times sum |S_ij r_j|), reported as the largest
|p| / (g sum |S r|) over the differing bits (must be <= 1).

    python benchmarks/bench_qjl.py [--n 16777216] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tq  # noqa: E402
from tq.backends import numpy_backend as ref  # noqa: E402
from tq.packing import unpack_bits  # noqa: E402

from bench_gpu import events_time, gpu_environment, np_of, take_rows  # noqa: E402


def sign_check(plan, x_rows, want, got) -> dict:
    """Differing QJL bits and the largest |p| / bound among them (float64 projection)."""
    p = plan.padded_dim
    qw, qg = unpack_bits(want.qjl, p, 1), unpack_bits(got.qjl, p, 1)
    diff = qw != qg
    out = {"qjl_bits_differing": int(diff.sum()), "qjl_bits": int(diff.size)}
    if not diff.any():
        out["max_p_over_bound"] = 0.0
        return out
    proj, bound = ref.qjl_sign_margin(plan, x_rows)
    out["max_p_over_bound"] = float((np.abs(proj) / (bound + 1e-300))[diff].max())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1 << 24)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--rotations", nargs="+", default=["hadamard"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--check-rows", type=int, default=1 << 16)
    ap.add_argument("--stem", default="qjl_mma_encode")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()

    import torch
    from tq.backends import cupy_backend as cb

    env, ceiling, _ = gpu_environment(torch)
    t0 = time.time()
    n, d = args.n, args.dim
    gen = torch.Generator(device="cuda").manual_seed(1234)
    x = torch.randn(n, d, device="cuda", dtype=torch.float16, generator=gen)
    rows = np.unique(np.concatenate([np.arange(min(n, 1024)), np.arange(max(0, n - 1024), n),
                                     np.random.default_rng(0).integers(0, n, args.check_rows)]))
    rows_dev = torch.from_numpy(rows).cuda()
    x_rows = np_of(x[rows_dev]).astype(np.float32)
    kernels = {"mma": {}, "exact": {}}

    def use(impl):
        cb.QJL_IMPL, cb.FAST_KERNELS = impl, kernels[impl]

    result_rows = []
    for rotation in args.rotations:
        for bits in args.bits:
            entry = {"rotation": rotation, "bits": bits}
            prod_q = tq.Quantizer(d, bits, kind="prod", rotation=rotation, seed=7, backend="cupy")
            mse_q = tq.Quantizer(d, bits, kind="mse", rotation=rotation, seed=7, backend="cupy")
            plan = prod_q.config.plan()
            want = ref.encode(plan, x_rows)
            for impl in ("exact", "mma"):
                use(impl)
                comp = prod_q.compress(x)
                got = take_rows(comp.parts, rows, rows_dev)
                dec = np_of(prod_q.decompress(comp)[rows_dev])
                dref = ref.decode(plan, got)
                entry[f"{impl}_decode_max_rel_err"] = float(np.max(
                    np.abs(dec - dref) / (np.linalg.norm(dref, axis=1, keepdims=True) + 1e-30)))
                same = {f: getattr(got, f).tobytes() == getattr(want, f).tobytes()
                        for f in ("codes", "norms", "qjl", "rnorms")}
                entry[f"{impl}_sections_identical"] = same
                entry[f"{impl}_signs"] = sign_check(plan, x_rows, want, got)
            use("mma")
            mse_q.compress(x)
            comp = prod_q.compress(x)
            times = {"exact": [], "mma": [], "mse": [], "dec_exact": [], "dec_mma": []}
            for _ in range(args.repeats):  # interleaved: the machine's drift hits all alike
                for impl in ("exact", "mma"):
                    use(impl)
                    times[impl].append(events_time(torch, lambda: prod_q.compress(x), 1)[0])
                    times["dec_" + impl].append(events_time(torch, lambda: prod_q.decompress(comp), 1)[0])
                use("mma")
                times["mse"].append(events_time(torch, lambda: mse_q.compress(x), 1)[0])
            for k, v in times.items():
                entry[f"{k}_ms"] = float(np.median(v)) * 1e3
                entry[f"{k}_runs_ms"] = [t * 1e3 for t in v]
            bpv = {"exact": plan.bytes_per_vector, "mma": plan.bytes_per_vector,
                   "mse": mse_q.config.plan().bytes_per_vector}
            for k in times:
                # compress: float16 in + packed out; decompress: packed in + float32 out
                moved = n * (4 * d + plan.bytes_per_vector) if k.startswith("dec") else n * (2 * d + bpv[k])
                entry[f"{k}_pct_copy"] = 100 * moved / (entry[f"{k}_ms"] / 1e3) / ceiling
            result_rows.append(entry)
            print(json.dumps(entry), flush=True)
    env["wall_seconds"] = round(time.time() - t0, 1)
    env["n"], env["dim"] = n, d

    lines = ["| rotation | bits | prod exact ms | prod mma ms | speed-up | mma % copy | mse ms (same run) "
             "| codes/norms/rnorms = reference (exact, mma) | exact signs = reference "
             "| mma signs differing | max p/bound | decompress exact ms | mma ms | mma % copy "
             "| decode rel. err (exact, mma) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in result_rows:
        other = lambda s: all(v for k, v in s.items() if k != "qjl")  # noqa: E731
        ms = e["mma_signs"]
        lines.append(
            f"| {e['rotation']} | {e['bits']} | {e['exact_ms']:.2f} | {e['mma_ms']:.2f} "
            f"| {e['exact_ms'] / e['mma_ms']:.2f}x | {e['mma_pct_copy']:.0f}% | {e['mse_ms']:.2f} "
            f"| {other(e['exact_sections_identical'])}, {other(e['mma_sections_identical'])} "
            f"| {e['exact_sections_identical']['qjl']} "
            f"| {ms['qjl_bits_differing']} of {ms['qjl_bits']} | {ms['max_p_over_bound']:.3f} "
            f"| {e['dec_exact_ms']:.2f} | {e['dec_mma_ms']:.2f} | {e['dec_mma_pct_copy']:.0f}% "
            f"| {e['exact_decode_max_rel_err']:.1e}, {e['mma_decode_max_rel_err']:.1e} |")
    table = "\n".join(lines)
    notes = ("\nTimes: CUDA events, median of the repeats, exact / mma / mse interleaved. "
             "% copy: compress (n d 2 bytes in + n B/vec out), decompress (n B/vec in + n d 4 out), "
             "over the time, against the copy ceiling above. "
             "max p/bound: over the differing sign bits, |p| / (g sum |S r|); <= 1 is what "
             "FORMAT.md section 5 allows.\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.json").write_text(json.dumps({"environment": env, "rows": result_rows}, indent=1))
    head = "\n".join(f"- {k}: {v}" for k, v in env.items())
    (out / f"{args.stem}.md").write_text(f"# {args.stem}\n\n{head}\n\n{table}\n{notes}")
    print(table)


if __name__ == "__main__":
    main()
