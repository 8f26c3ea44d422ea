"""Where does a small decode launch spend its time?  (batch 1, 32 q heads, 8 kv heads, d 128)

The fused decode kernel has a floor of tens of microseconds at batch 1 (4K tokens
take nearly as long as 32K).  This probe separates the parts of that floor:
context length (window only, a few compressed tiles, ... 128K), the full-precision
window (128 vs 0 tokens), and the number of splits per (sequence, kv head), forced
past the planner.  Each figure is the median of triton's do_bench (L2 flushed).

    python benchmarks/probe_decode_latency.py --out benchmarks/results
    python benchmarks/probe_decode_latency.py --trace   # phase timeline of single launches
    python benchmarks/probe_decode_latency.py --contexts 131072 --windows 128 \
        --forced-at 131072 --splits 32,45,62,90 --presets K4/V4,K3/V2   # a split sweep

--trace builds the kernels with -DTQ_TRACE (thread 0 of each block stores the
global timer at phase boundaries, tq/kernels/decode.cu) and prints, per case of
--trace-cases, the phases' medians over the split blocks, the window blocks and the
finishing blocks; any --batch whose launch has at most 4096 blocks (tq_trace's rows).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_decode import bench, log  # noqa: E402  (also puts the checkout on sys.path)
from _common import environment  # noqa: E402

HQ, HKV, D = 32, 8, 128


def force_splits(layer, splits):
    """Make the layer's next launches use `splits` blocks per (sequence, kv head) (None: the planner's)."""
    layer.split_override = splits


def use_schedule(sched):
    """"fixed": torch's deterministic mode, in which decode_attention takes the fixed schedule
    (without filling every torch.empty, decode's output too); "steal": the default again."""
    import torch

    torch.use_deterministic_algorithms(sched == "fixed")
    torch.utils.deterministic.fill_uninitialized_memory = sched != "fixed"


PHASES = ("start", "tables", "queries", "tiles", "partial", "arrived", "finished", "empty exit",
          "staged", "scored", "values", "weights", "merged", "rotated")


def trace_launch(layer, q, impl):
    """Phase times (us from the launch's first block start) of one decode launch."""
    import cupy as cp
    import numpy as np
    import torch

    mod = layer._module("decode", q.shape[1] // layer.num_kv_heads)
    buf = cp.ndarray((4096, 16), cp.uint64, mod.module.get_global("tq_trace"))
    buf.fill(0)
    torch.cuda.synchronize()
    layer.decode_attention(q, impl=impl)
    torch.cuda.synchronize()
    tr = cp.asnumpy(buf).astype(np.int64)
    splits = layer.last_plan[1]
    wblocks = [v for k, v in layer._smem_plans.items() if k[3] == splits][-1][1]  # key: (module, impl, nrep, splits)
    pairs = layer.num_kv_heads * layer.batch
    nblk = (splits + wblocks) * pairs
    if nblk > buf.shape[0]:
        raise ValueError(f"--trace: {nblk} blocks exceed the trace buffer's {buf.shape[0]} (decode.cu tq_trace)")
    smid = tr[:nblk, 15] - 1
    tr = tr[:nblk, :len(PHASES)]
    t0 = tr[:, 0].min()
    us = np.where(tr > 0, (tr - t0) / 1e3, np.nan)
    nsb = splits * pairs
    split, win = us[:nsb], us[nsb:]
    fin = us[~np.isnan(us[:, 6])]
    med = lambda a, k: float(np.nanmedian(a[:, k])) if np.isfinite(a[:, k]).any() else float("nan")  # noqa: E731
    return dict(blocks=int(nblk), split_blocks=int(nsb), window_blocks=int(nblk - nsb),
                split={PHASES[k]: med(split, k) for k in range(8)},
                split_last_start=float(np.nanmax(split[:, 0])) if nsb else float("nan"),
                split_last_tiles=float(np.nanmax(split[:, 3])) if nsb else float("nan"),
                split_last_arrived=float(np.nanmax(split[:, 5])) if nsb else float("nan"),
                win_blocks={n: med(win, k) for n, k in (('start', 0), ('staged', 8), ('scored', 9), ('values', 10),
                                                    ('arrived', 5), ('finished', 6))},
                finish={PHASES[k]: med(fin, k) for k in (0, 4, 5, 11, 12, 13, 6)},
                end=float(np.nanmax(us[:, 6])),
                # per block (split blocks first): SM, start, tiles done, arrived (us; NaN = none)
                raw=dict(sm=smid.tolist(), start=np.round(us[:, 0], 2).tolist(),
                         tiles=np.round(us[:, 3], 2).tolist(), arrived=np.round(us[:, 5], 2).tolist()))


def presets(args):
    """[(name, (key_bits, value_bits))] from --presets "K4/V4,K3/V2"."""
    out = []
    for name in args.presets.split(","):
        k, v = name.upper().split("/")
        out.append((name, (int(k[1:]), int(v[1:]))))
    return out


def run_trace(args):
    import torch

    from tq.cuda import PackedKVLayer

    B = args.batch
    q = torch.randn(B, HQ, D, device="cuda", dtype=torch.bfloat16)
    cases = [tuple(int(x) for x in c.split(":")) for c in args.trace_cases.split(",") if c]
    out = []
    for impl, (preset, (kb, vb)) in itertools.product(args.impls.split(","), presets(args)):
        for window, ctx in cases:
            layer = PackedKVLayer(HKV, D, kb, vb, seed=1, window=window, batch=B, capacity=ctx + 64)
            k = torch.randn(B, HKV, ctx, D, device="cuda", dtype=torch.bfloat16)
            layer.append(k, torch.randn_like(k))
            for _ in range(3):
                layer.decode_attention(q, impl=impl)
            try:
                r = trace_launch(layer, q, impl)
            except ValueError as e:
                log(f"{impl} {preset} B={B} W={window} ctx={ctx}: skipped ({e})")
                continue
            r.update(impl=impl, preset=preset, window=window, ctx=ctx, batch=B)
            out.append(r)
            f = lambda d: " ".join(f"{k} {v:.1f}" for k, v in d.items())  # noqa: E731
            log(f"{impl} {preset} B={B} W={window} ctx={ctx}: {r['blocks']} blocks, end {r['end']:.1f} us, "
                f"last split start {r['split_last_start']:.1f}, tiles {r['split_last_tiles']:.1f}, "
                f"arrived {r['split_last_arrived']:.1f}")
            log(f"   split  : {f(r['split'])}")
            log(f"   window : {f(r['win_blocks'])}")
            log(f"   finish : {f(r['finish'])}")
    return out


def main():
    import torch

    from tq.cuda import PackedKVLayer

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--impls", default="mma,mmt")
    ap.add_argument("--stem", default="decode_latency_probe")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--contexts", default="1,64,256,1024,4096,32768,131072")
    ap.add_argument("--windows", default="128,0")
    ap.add_argument("--no-forced", action="store_true", help="skip the forced-split sweeps")
    ap.add_argument("--presets", default="K4/V4", help='key/value bits, e.g. "K4/V4,K3/V2"')
    ap.add_argument("--batch", type=int, default=1, help="sequences")
    ap.add_argument("--schedules", default="steal",
                    help='"steal" (default: the schedule decode_attention picks), "fixed" (under '
                         'torch.use_deterministic_algorithms) or both, timed side by side')
    ap.add_argument("--trace-cases", default="128:1,0:64,128:4096,128:32768",
                    help="window:context pairs of --trace")
    ap.add_argument("--forced-at", default="4096,32768", help="contexts of the forced-split sweeps")
    ap.add_argument("--splits", default="4,8,16,24,32,48,64", help="splits of the forced-split sweeps")
    args = ap.parse_args()
    forced_at = {int(c) for c in args.forced_at.split(",") if c}
    forced_splits = [int(c) for c in args.splits.split(",") if c]
    if args.trace:
        os.environ["TQ_DECODE_DEFINES"] = (os.environ.get("TQ_DECODE_DEFINES", "") + " -DTQ_TRACE=1").strip()
        res = run_trace(args)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, args.stem + "_trace.json"), "w") as f:
            json.dump(dict(env=dict(gpu=torch.cuda.get_device_name(0), command=" ".join(sys.argv)), rows=res), f)
        return
    rows = []
    B = args.batch
    q = torch.randn(B, HQ, D, device="cuda", dtype=torch.bfloat16)
    x = torch.zeros(1, device="cuda")
    t_empty = bench(lambda: x.add_(1))
    rows.append(dict(case="empty torch op", ms=t_empty))
    log(f"empty op {t_empty * 1e3:.1f} us")
    for impl, (preset, (kb, vb)) in itertools.product(args.impls.split(","), presets(args)):
        for window in map(int, args.windows.split(",")):
            for ctx in map(int, args.contexts.split(",")):
                if window == 0 and ctx < 64:
                    continue
                layer = PackedKVLayer(HKV, D, kb, vb, seed=1, window=window, batch=B, capacity=ctx + 64)
                k = torch.randn(B, HKV, ctx, D, device="cuda", dtype=torch.bfloat16)
                layer.append(k, torch.randn_like(k))
                layer.decode_attention(q, impl=impl)
                plan = layer.last_plan[1:]
                for sched in args.schedules.split(","):
                    use_schedule(sched)
                    t = bench(lambda: layer.decode_attention(q, impl=impl))
                    rows.append(dict(case="context", impl=impl, preset=preset, window=window, ctx=ctx, batch=B,
                                     splits=plan[0], chunk=plan[1], ms=t, schedule=sched))
                    log(f"{impl} {preset} W={window} ctx={ctx} {sched}: {t * 1e3:.1f} us "
                        f"(splits {plan[0]}, chunk {plan[1]})")
                use_schedule("steal")
                if ctx in forced_at and window == 128 and not args.no_forced:
                    for sp in forced_splits:
                        force_splits(layer, sp)
                        layer.decode_attention(q, impl=impl)
                        splits, chunk = layer.last_plan[1:]
                        for sched in args.schedules.split(","):
                            use_schedule(sched)
                            t = bench(lambda: layer.decode_attention(q, impl=impl))
                            rows.append(dict(case="forced splits", impl=impl, preset=preset, window=window,
                                             ctx=ctx, batch=B, splits=splits, chunk=chunk, ms=t,
                                             schedule=sched, last_schedule=layer.last_schedule))
                            log(f"  forced splits {splits} (chunk {chunk}) {sched} "
                                f"[{layer.last_schedule}]: {t * 1e3:.1f} us")
                        use_schedule("steal")
                    force_splits(layer, None)
                del layer, k
    env = environment(("torch", "triton", "cupy"))
    env["gpu"] = torch.cuda.get_device_name(0)
    env["command"] = " ".join(["python3"] + sys.argv)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, args.stem + ".json"), "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=1)
    lines = [f"# Decode latency probe (batch {B}, {HQ} q / {HKV} kv heads, d {D})", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()] + [""]
    lines += [f"Empty torch op under the same timer: {t_empty * 1e3:.1f} us", ""]
    lines += ["| impl | preset | window | context | splits | chunk | forced | schedule | time (us) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows[1:]:
        lines.append(f"| {r['impl']} | {r['preset']} | {r['window']} | {r['ctx']} | {r['splits']} | {r['chunk']} | "
                     f"{'yes' if r['case'] == 'forced splits' else ''} | {r.get('schedule', 'steal')} | "
                     f"{r['ms'] * 1e3:.1f} |")
    with open(os.path.join(args.out, args.stem + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
