"""GPU throughput of the cupy and torch backends against the device's copy ceiling.

1. Copy ceiling: a large device-to-device copy, (bytes read + bytes written) / time.
2. For n vectors (default 2**24) of dim 128 in float16, fresh random data:
   compress, decompress and inner products from packed codes (16 queries),
   bits 2, 3, 4, kinds mse/prod, rotations hadamard/haar, both GPU backends.
   First a correctness check against the NumPy reference on rows spread over
   the whole batch (first, random, last).  Times are CUDA events around
   back-to-back calls, median of repeats; bandwidth counts the bytes that must
   move (input read once + output written once).

    python benchmarks/bench_gpu.py [--n 16777216] [--out benchmarks/results]

Writes gpu_throughput.md and gpu_throughput.json to --out.
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
from tq.backends.base import Parts  # noqa: E402
from tq.packing import unpack_bits  # noqa: E402

from _common import environment  # noqa: E402


def events_time(torch, fn, repeats, inner=1, warmup=1):
    """Median seconds per call: CUDA events around `inner` back-to-back calls (default stream)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / inner)
    return float(np.median(times)), times


def copy_ceiling(torch, nbytes=4 << 30, repeats=10):
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    t, _ = events_time(torch, lambda: dst.copy_(src), repeats, inner=3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / t, t


def gpu_environment(torch):
    """(environment with the GPU's name and copy ceiling, ceiling in bytes/s, copy seconds)."""
    env = environment(("torch", "cupy"))
    env["gpu"] = torch.cuda.get_device_name()
    bw, tcopy = copy_ceiling(torch)
    env["copy_ceiling_GBps"] = round(bw / 1e9, 1)
    return env, bw, tcopy


def np_of(a):
    if type(a).__module__.startswith("torch"):
        return a.detach().cpu().numpy()
    return a.get()


def take_rows(p: Parts, rows_np, rows_dev):
    """Some rows of each section, gathered on the device, as NumPy arrays."""
    def one(a):
        return np_of(a[rows_dev]) if a.shape[0] else np_of(a)

    return Parts(*(one(a) for a in (p.codes, p.norms, p.qjl, p.rnorms)))


def check(plan, x16_rows, parts_rows: Parts, q, scores_rows, decoded_rows):
    """Compare a backend's output on some rows with the reference; returns a dict of findings."""
    cfg = plan.config
    xr = x16_rows.astype(np.float32)
    want = ref.encode(plan, xr)
    same = {nm: getattr(parts_rows, nm).tobytes() == getattr(want, nm).tobytes()
            for nm in ("codes", "norms", "qjl", "rnorms")}
    out = {"bytes_identical": all(same.values()), "sections_identical": same}
    if cfg.mse_bits > 0 and not same["codes"]:
        p = plan.padded_dim
        out["codes_differing"] = int((unpack_bits(want.codes, p, cfg.mse_bits)
                                      != unpack_bits(parts_rows.codes, p, cfg.mse_bits)).sum())
    if cfg.kind == "prod" and not same["qjl"]:
        p = plan.padded_dim
        out["qjl_bits_differing"] = int((unpack_bits(want.qjl, p, 1) != unpack_bits(parts_rows.qjl, p, 1)).sum())
    dref = ref.decode(plan, parts_rows)
    scale = np.linalg.norm(dref, axis=1, keepdims=True) + 1e-30
    out["decode_max_rel_err"] = float(np.max(np.abs(decoded_rows - dref) / scale))
    sref = ref.scores(plan, q, parts_rows)
    qn = np.linalg.norm(q, axis=1, keepdims=True)
    xn = np.linalg.norm(dref, axis=1)[None, :] + 1e-30
    out["scores_max_rel_err"] = float(np.max(np.abs(scores_rows - sref) / (qn * xn)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1 << 24)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--kinds", nargs="+", default=["mse", "prod"])
    ap.add_argument("--rotations", nargs="+", default=["hadamard", "haar"])
    ap.add_argument("--backends", nargs="+", default=["cupy", "torch"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--torch-repeats", type=int, default=2)
    ap.add_argument("--check-rows", type=int, default=2048)
    ap.add_argument("--deadline", type=float, default=1e9,
                    help="seconds; past it, torch timings are skipped (CuPy ones are cheap)")
    ap.add_argument("--scores-impls", default="auto",
                    help="CuPy inner-product kernels to time side by side: auto (tensor cores where they "
                         "apply), fma (the float32 kernel); e.g. auto,fma")
    ap.add_argument("--stem", default="gpu_throughput")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()

    import cupy as cp
    import torch

    t_start = time.time()
    env, bw, tcopy = gpu_environment(torch)
    props = torch.cuda.get_device_properties(0)
    env["sm_count"] = props.multi_processor_count
    env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    env["cuda_runtime"] = cp.cuda.runtime.runtimeGetVersion()
    env["cuda_driver"] = cp.cuda.runtime.driverGetVersion()
    env["torch_cuda"] = torch.version.cuda
    from tq.backends import cupy_backend

    env["cupy_kernel_defines"] = " ".join(cupy_backend.kernel_defines())  # row split (TQ_CUPY_* overrides)
    env["n"], env["dim"], env["queries"], env["input_dtype"] = args.n, args.dim, args.queries, "float16"

    print(f"copy ceiling: {bw / 1e9:.0f} GB/s (4 GiB copy in {tcopy * 1e3:.2f} ms)", flush=True)

    n, d, m = args.n, args.dim, args.queries
    gen = torch.Generator(device="cuda").manual_seed(int(time.time()) & 0xFFFF)
    x = torch.randn((n, d), device="cuda", dtype=torch.float16, generator=gen)  # fresh random data
    x_cp = cp.from_dlpack(x)  # the same memory as a CuPy array
    q_np = np.random.default_rng(int(time.time())).standard_normal((m, d)).astype(np.float32)
    q_t, q_cp = torch.from_numpy(q_np).cuda(), cp.asarray(q_np)
    k = args.check_rows
    rows = np.unique(np.concatenate([np.arange(k), np.random.default_rng(1).integers(0, n, k),
                                     np.arange(n - k, n)]))
    rows = rows[(rows >= 0) & (rows < n)]
    x_rows = x[torch.from_numpy(rows).cuda()].cpu().numpy()
    rows_t = torch.from_numpy(rows).cuda()

    results = []
    for rotation in args.rotations:
        for kind in args.kinds:
            for bits in args.bits:
                cfg = tq.QuantizerConfig(d, bits, kind=kind, rotation=rotation, seed=1)
                plan = cfg.plan()
                bpv = plan.bytes_per_vector
                bytes_moved = {"compress": n * d * 2 + n * bpv, "decompress": n * bpv + n * d * 4,
                               "inner_product": n * bpv + m * n * 4}
                for name in args.backends:
                    if name != "cupy" and time.time() - t_start > args.deadline:
                        print(f"{name} {rotation} {kind} b={bits}: skipped (deadline)", flush=True)
                        env.setdefault("skipped", []).append(f"{name} {rotation} {kind} {bits}")
                        continue
                    be = tq.get_backend(name)
                    xin, qin = (x_cp, q_cp) if name == "cupy" else (x, q_t)
                    rep = args.repeats if name == "cupy" else args.torch_repeats
                    inner = 3 if name == "cupy" else 1
                    parts = be.encode(plan, xin)
                    dec = be.decode(plan, parts)
                    sc = be.scores(plan, qin, parts)
                    rdev = cp.asarray(rows) if name == "cupy" else rows_t
                    dec_rows, sc_rows = np_of(dec[rdev]), np_of(sc[:, rdev])
                    found = check(plan, x_rows, take_rows(parts, rows, rdev), q_np, sc_rows, dec_rows)
                    del dec, sc
                    row = {"backend": name, "rotation": rotation, "kind": kind, "bits": bits,
                           "bytes_per_vector": bpv, "check": found}
                    fns = {"compress": lambda: be.encode(plan, xin), "decompress": lambda: be.decode(plan, parts),
                           "inner_product": lambda: be.scores(plan, qin, parts)}
                    for op, fn in fns.items():  # the checked calls above were the warm-up
                        t, samples = events_time(torch, fn, rep, inner=inner, warmup=0 if name == "torch" else 1)
                        gbps = bytes_moved[op] / t / 1e9
                        row[op] = {"ms": t * 1e3, "GBps": gbps, "fraction_of_copy": gbps * 1e9 / bw,
                                   "bytes": bytes_moved[op], "samples_ms": [s * 1e3 for s in samples]}
                        cp.get_default_memory_pool().free_all_blocks()
                        torch.cuda.empty_cache()
                    if name == "cupy":  # inner-product kernels side by side, each checked first
                        from tq.backends import cupy_backend as cb
                        saved = cb.SCORES_IMPL
                        for impl in args.scores_impls.split(","):
                            cb.SCORES_IMPL = impl
                            sc_rows_i = np_of(be.scores(plan, qin, parts)[:, rdev])
                            err = check(plan, x_rows, take_rows(parts, rows, rdev), q_np, sc_rows_i,
                                        dec_rows)["scores_max_rel_err"]
                            t, samples = events_time(torch, fns["inner_product"], rep, inner=inner)
                            gbps = bytes_moved["inner_product"] / t / 1e9
                            row.setdefault("scores_impls", {})[impl] = {
                                "ms": t * 1e3, "GBps": gbps, "fraction_of_copy": gbps * 1e9 / bw,
                                "tensor_cores": cb.mma_scores_ok(plan), "scores_max_rel_err": err,
                                "samples_ms": [s_ * 1e3 for s_ in samples]}
                        cb.SCORES_IMPL = saved
                    del parts
                    cp.get_default_memory_pool().free_all_blocks()
                    torch.cuda.empty_cache()
                    results.append(row)
                    print(f"{name:5s} {rotation:8s} {kind:4s} b={bits}: "
                          + "  ".join(f"{op} {row[op]['ms']:7.2f} ms {row[op]['GBps']:6.0f} GB/s "
                                      f"({100 * row[op]['fraction_of_copy']:3.0f}%)" for op in fns)
                          + f"  exact={found['bytes_identical']} dec_err={found['decode_max_rel_err']:.1e}"
                          f" sc_err={found['scores_max_rel_err']:.1e}", flush=True)
                    for impl, v in row.get("scores_impls", {}).items():
                        print(f"      scores[{impl}{'/tc' if v['tensor_cores'] else ''}] {v['ms']:7.2f} ms "
                              f"{v['GBps']:6.0f} GB/s ({100 * v['fraction_of_copy']:3.0f}%) err={v['scores_max_rel_err']:.1e}",
                              flush=True)
                    write(args.out, env, results, stem=args.stem)  # partial results survive a timeout

    # registers / local memory of the fast kernels used here (diagnostics)
    from tq.backends import cupy_backend as cb

    env["kernels"] = {f"{k[0]}<{k[1]},{k[2]},{k[3]}>": {"regs": kern.num_regs, "local_bytes": kern.local_size_bytes}
                      for k, kern in sorted(cb.FAST_KERNELS.items())}
    env["wall_seconds"] = round(time.time() - t_start, 1)
    write(args.out, env, results, stem=args.stem)


def write(out_dir, env, results, extra_notes="", stem="gpu_throughput"):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(env, command="python " + " ".join(sys.argv))
    (out / f"{stem}.json").write_text(json.dumps({"environment": env, "rows": results}, indent=1))
    runs = any("run" in r for r in results)
    lines = ["| backend | rotation | kind | bits | B/vec | compress ms | GB/s | % copy | decompress ms | GB/s | % copy "
             "| inner product ms | GB/s | % copy | bytes exact vs reference |" + (" run |" if runs else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if runs else "")]
    for r in results:
        cells = [r["backend"], r["rotation"], r["kind"], str(r["bits"]), str(r["bytes_per_vector"])]
        for op in ("compress", "decompress", "inner_product"):
            cells += [f"{r[op]['ms']:.2f}", f"{r[op]['GBps']:.0f}", f"{100 * r[op]['fraction_of_copy']:.0f}%"]
        c = r["check"]
        exact = "yes" if c["bytes_identical"] else "no: " + ", ".join(
            [f"{k}={v}" for k, v in c.items() if k.endswith("differing")]
            + [f"{k} differ" for k, v in c["sections_identical"].items() if not v and k in ("norms", "rnorms")])
        cells.append(exact)
        if runs:
            cells.append(str(r.get("run", "")))
        lines.append("| " + " | ".join(cells) + " |")
    head = "\n".join(f"- {k}: {v}" for k, v in env.items() if k != "kernels")
    kern = "\n".join(f"- {k}: {v['regs']} registers, {v['local_bytes']} B local" for k, v in env.get("kernels", {}).items())
    notes = (
        "\nBytes that must move: compress = n*d*2 (float16 input) + n*B/vec; decompress = n*B/vec + n*d*4 "
        "(float32 output); inner product = n*B/vec + queries*n*4 (float32 scores).  '% copy' is achieved "
        "bandwidth over the device-to-device copy ceiling above.  Times: CUDA events, median of repeats "
        "(CuPy: 3 back-to-back calls per sample).\n")
    ab = [r for r in results if r.get("scores_impls")]
    if ab:
        impls = list(ab[0]["scores_impls"])
        lines += ["", "Inner-product kernels side by side (same run, same data; ms, % of copy, max error "
                  "relative to |q| |x|):", "",
                  "| rotation | kind | bits | " + " | ".join(f"{i} ms | {i} % copy | {i} error" for i in impls)
                  + " | speed-up |", "|---|---|---|" + "---|---|---|" * len(impls) + "---|"]
        for r in ab:
            v = r["scores_impls"]
            cells = [r["rotation"], r["kind"], str(r["bits"])]
            for i in impls:
                tc = " (tensor cores)" if v[i]["tensor_cores"] else ""
                cells += [f"{v[i]['ms']:.3f}{tc}", f"{100 * v[i]['fraction_of_copy']:.0f}%",
                          f"{v[i]['scores_max_rel_err']:.1e}"]
            cells.append(f"{v[impls[-1]]['ms'] / v[impls[0]]['ms']:.2f}x" if len(impls) > 1 else "")
            lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    text = (f"# {stem}\n\n{head}\n\n{table}\n{notes}\n{extra_notes}"
            + (f"\nFast kernels (registers / local memory per thread):\n{kern}\n" if kern else ""))
    (out / f"{stem}.md").write_text(text)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
