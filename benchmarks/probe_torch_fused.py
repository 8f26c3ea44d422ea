"""Torch backend encode on CUDA: eager ops vs the torch.compile'd core, side by side with CuPy.

For n rows of dim 128 in float16 (fresh random data), hadamard rotation, both kinds,
bits 2, 3, 4: every output byte of each torch path is compared with the CuPy kernel
(itself byte-exact against the NumPy reference, tests/test_cupy_backend.py), then timed
with CUDA events (median of repeats).  A few edge configurations (dim 100 with norm
correction, bfloat16 input, zero / tiny / huge rows) are checked for bytes only.

    python benchmarks/probe_torch_fused.py [--n 16777216] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tq  # noqa: E402
from tq.backends import torch_backend as tb  # noqa: E402

from bench_gpu import events_time, gpu_environment  # noqa: E402

FIELDS = ("codes", "norms", "qjl", "rnorms")


def same(a, b, cp):
    """Per field: bytes equal; for the QJL signs (a matmul in torch, FORMAT.md section 5) the
    fraction of differing sign bits instead when they are not all equal."""
    out = {}
    for f in FIELDS:
        x, y = cp.asarray(getattr(a, f)), cp.from_dlpack(getattr(b, f))
        if x.shape != y.shape:
            out[f] = f"shape {x.shape} != {y.shape}"
        elif bool((x == y).all()):
            out[f] = True
        elif f == "qjl":
            bits = cp.unpackbits(cp.bitwise_xor(x, y)).sum()
            out[f] = f"{float(bits) / (8 * x.size):.2e} of sign bits differ"
        else:
            out[f] = False
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1 << 24)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--kinds", nargs="+", default=["mse", "prod"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--eager", action="store_true", help="also time the eager torch path (slow)")
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 2, 3],
                    help="FWHT groups (butterfly stages per kernel) to compile and time side by side")
    ap.add_argument("--chunk-elems", type=int, nargs="+", default=[tb._CHUNK_ELEMS],
                    help="torch_backend._CHUNK_ELEMS values (elements per compiled call) timed side by side")
    ap.add_argument("--profile", action="store_true",
                    help="write the CUDA kernels of one compiled call (first kind and bits) to torch_fused_profile.md")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    import cupy as cp
    import torch

    env, bw, _ = gpu_environment(torch)
    cupy_be, torch_be = tq.get_backend("cupy"), tq.get_backend("torch")
    rows, edge = [], []
    # edge configurations: bytes only
    g = torch.Generator(device="cuda").manual_seed(7)
    for dim, bits, kind, nc, dt in [(100, 3, "mse", True, torch.float16), (128, 4, "prod", True, torch.bfloat16),
                                    (64, 2, "mse", False, torch.float32), (96, 1, "prod", False, torch.float16)]:
        plan = tq.QuantizerConfig(dim, bits, kind=kind, seed=5, norm_correction=nc).plan()
        x = torch.randn((70001, dim), device="cuda", generator=g).to(dt)
        x[0] = 0
        x[1] *= 1e-30 if dt != torch.float16 else 1e-4
        x[2] = x[2] * (1e30 if dt != torch.float16 else 3e3)
        ok = same(cupy_be.encode(plan, cp.from_dlpack(x)), tb.encode_fused(plan, x, tb.fused_encode_fn(plan, args.groups[-1])), cp)
        edge.append({"dim": dim, "bits": bits, "kind": kind, "norm_correction": nc, "dtype": str(dt), "bytes_equal": ok})
        print("edge", edge[-1], flush=True)
    n, d = args.n, 128
    x = torch.randn((n, d), device="cuda", dtype=torch.float16, generator=g)
    xc = cp.from_dlpack(x)
    for kind in args.kinds:
        for bits in args.bits:
            plan = tq.QuantizerConfig(d, bits, kind=kind, seed=1).plan()
            moved = n * d * 2 + n * plan.bytes_per_vector
            ref = cupy_be.encode(plan, xc)
            row = {"kind": kind, "bits": bits}
            fns = {"cupy": lambda: cupy_be.encode(plan, xc)}
            for grp in args.groups:
                for ce in args.chunk_elems:
                    tb._CHUNK_ELEMS = ce
                    tag = f"g{grp}" + (f"_c{ce.bit_length() - 1}" if len(args.chunk_elems) > 1 else "")
                    tb._COMPILED.clear()
                    fn = tb.fused_encode_fn(plan, grp)
                    t0 = time.time()
                    fused = tb.encode_fused(plan, x, fn)
                    torch.cuda.synchronize()
                    row[f"compile_s_{tag}"] = round(time.time() - t0, 1)
                    row[f"fused_equal_{tag}"] = same(ref, fused, cp)
                    del fused
                    fns[f"torch_fused_{tag}"] = (lambda f=fn, c=ce: timed_chunks(tb, c, lambda: tb.encode_fused(plan, x, f)))
                    if args.profile and not rows and ce == args.chunk_elems[0]:
                        profile(torch, tb, ce, lambda f=fn: tb.encode_fused(plan, x, f), args.out, f"{kind} b{bits} {tag}")
            if args.eager:
                row["eager_bytes_equal"] = same(ref, torch_be.encode(plan, x), cp)
                fns["torch_eager"] = lambda: torch_be.encode(plan, x)
            del ref
            for name, fn in fns.items():
                t, samples = events_time(torch, fn, args.repeats if name != "torch_eager" else 2)
                row[name] = {"ms": t * 1e3, "fraction_of_copy": moved / t / bw, "samples_ms": [s * 1e3 for s in samples]}
                cp.get_default_memory_pool().free_all_blocks()
                torch.cuda.empty_cache()
            best = min((k for k in row if k.startswith("torch_fused_g")), key=lambda k: row[k]["ms"])
            row["torch_fused"], row["best_variant"] = row[best], best[len("torch_fused_"):]
            row["fused_bytes_equal"] = row[f"fused_equal_{row['best_variant']}"]
            row["fused_over_cupy"] = row["torch_fused"]["ms"] / row["cupy"]["ms"]
            rows.append(row)
            print(row, flush=True)
            write(args.out, env, rows, edge)


def timed_chunks(tb, chunk_elems, fn):
    tb._CHUNK_ELEMS = chunk_elems
    return fn()


_PROFILES: list = []


def profile(torch, tb, chunk_elems, fn, out, label):
    """CUDA kernels of one call, by total device time (where the compiled path spends it)."""
    from torch.profiler import ProfilerActivity, profile as prof

    timed_chunks(tb, chunk_elems, fn)
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        timed_chunks(tb, chunk_elems, fn)
        torch.cuda.synchronize()
    events = [e for e in p.key_averages() if getattr(e, "device_time_total", 0) > 0]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events)
    lines = [f"## torch_fused_profile ({label})", "", f"total device time {total / 1e3:.2f} ms", "",
             "| kernel | calls | device ms | share |", "|---|---|---|---|"]
    for e in events[:25]:
        lines.append(f"| `{e.key[:90]}` | {e.count} | {e.device_time_total / 1e3:.2f} | {100 * e.device_time_total / total:.1f}% |")
    _PROFILES.append("\n".join(lines) + "\n")
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "torch_fused_profile.md").write_text("\n".join(_PROFILES))
    print("\n".join(lines), flush=True)


def write(out, env, rows, edge):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "torch_fused_encode.json").write_text(json.dumps({"environment": env, "rows": rows, "edge": edge}, indent=1))
    lines = ["| kind | bits | CuPy ms (% copy) | torch compiled ms (% copy), best variant | compiled / CuPy | torch eager ms | bytes equal (compiled, eager) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        eg = r.get("torch_eager")
        cells = [r["kind"], str(r["bits"]),
                 f"{r['cupy']['ms']:.2f} ({100 * r['cupy']['fraction_of_copy']:.0f}%)",
                 f"{r['torch_fused']['ms']:.2f} ({100 * r['torch_fused']['fraction_of_copy']:.0f}%), {r['best_variant']}",
                 f"{r['fused_over_cupy']:.2f}x", f"{eg['ms']:.1f}" if eg else "-",
                 f"{r['fused_bytes_equal']}, {r.get('eager_bytes_equal', '-')}"]
        lines.append("| " + " | ".join(cells) + " |")
    edge_lines = ["", "Edge configurations (bytes of the compiled torch path against CuPy, 70001 rows incl. zero, tiny, huge):", ""]
    edge_lines += [f"- {e}" for e in edge]
    head = "\n".join(f"- {k}: {v}" for k, v in env.items())
    (out / "torch_fused_encode.md").write_text("# torch_fused_encode\n\n" + head + "\n\n" + "\n".join(lines + edge_lines) + "\n")


if __name__ == "__main__":
    main()
