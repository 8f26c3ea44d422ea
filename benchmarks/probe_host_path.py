"""Host (CPU) microseconds per call of a decode step's cache work, tq against transformers.

    python benchmarks/probe_host_path.py [--context 1024] [--calls 2000] [--out DIR]

One layer in the Llama-3-8B shape (32 query / 8 KV heads, head_dim 128, bf16, batch 1),
``--context`` tokens held (short, so the GPU finishes each call before the host issues the
next and the timer sees host time only).  Rows: ``FusedCudaLayer.update`` (one token) and
``attend`` (the fused decode kernel), the bare ``PackedKVLayer.append`` /
``decode_attention`` beneath them, and transformers' ``DynamicLayer.update`` + its SDPA
attention function for comparison.  Each is the median of 5 timings of ``--calls`` calls;
a cProfile of the tq calls (own time per call) follows.  Writes host_path.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, profile_rows  # noqa: E402

HQ, HKV, D = 32, 8, 128


def per_call_us(fn, calls, reps=5):
    """Median host us per call (the device synchronized once per timing, outside the calls)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        times.append((t1 - t0) / calls * 1e6)
    return statistics.median(times), times


class _Module:  # what the attention functions read off an attention module
    num_key_value_groups = HQ // HKV
    is_causal = True
    training = False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--preset", default="K4V4")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    from transformers.cache_utils import DynamicLayer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tq.hf.config import parse_preset, with_overrides
    from tq.hf.cuda_layer import FusedCudaLayer

    dev, bf = "cuda", torch.bfloat16
    ctx, n = args.context, args.calls
    k0 = torch.randn(1, HKV, ctx, D, device=dev, dtype=bf)
    k1 = torch.randn(1, HKV, 1, D, device=dev, dtype=bf)
    q = torch.randn(1, HQ, 1, D, device=dev, dtype=bf)
    ks, vs = parse_preset(args.preset)   # as TurboQuantCache sets them: key centering on
    ks = with_overrides(ks, seed=0, norm_correction=True, center=True)
    vs = with_overrides(vs, seed=1, norm_correction=True, center=False)
    cap = ctx + 6 * n * 5 + 64
    fused = FusedCudaLayer(ks, vs, window=128, layer_idx=0, capacity=cap)
    fused.update(k0, k0)
    fused.update(k1, k1)
    fused.attend(None, q, k1, k1, None, D ** -0.5, sdpa_attention_forward)
    packed = fused.fused
    dyn = DynamicLayer()
    dyn.update(k0, k0)
    mod = _Module()

    def dyn_update():
        dyn.update(k1, k1)

    def dyn_attend():
        sdpa_attention_forward(mod, q, dyn.keys, dyn.values, None, scaling=D ** -0.5)

    def tq_update():
        fused.update(k1, k1)

    def tq_attend():
        fused.attend(None, q, k1, k1, None, D ** -0.5, sdpa_attention_forward)

    q3 = q[:, :, 0]

    def tq_append():
        packed.append(k1, k1)

    def tq_decode():
        packed.decode_attention(q3, D ** -0.5)

    cases = {"DynamicLayer.update": dyn_update, "sdpa_attention_forward (DynamicLayer)": dyn_attend,
             "FusedCudaLayer.update": tq_update, "FusedCudaLayer.attend": tq_attend,
             "PackedKVLayer.append": tq_append, "PackedKVLayer.decode_attention": tq_decode}
    x = torch.zeros(1, device=dev)
    cases = {"empty torch op (x.add_(1))": lambda: x.add_(1), **cases}
    rows = []
    for name, fn in cases.items():
        fn()
        if name.startswith("DynamicLayer"):
            dyn.keys, dyn.values = dyn.keys[:, :, :ctx], dyn.values[:, :, :ctx]
        med, runs = per_call_us(fn, n if "Dynamic" not in name else min(n, 200))
        rows.append(dict(case=name, host_us_per_call=med, runs_us=runs))
        print(f"{name:<42} {med:7.1f} us/call  runs {' '.join(f'{r:.1f}' for r in runs)}", flush=True)
    profiles = {name: profile_rows(cases[name], n // 4, top=15) for name in ("FusedCudaLayer.update", "FusedCudaLayer.attend")}
    env = environment(("torch", "transformers", "cupy"))
    env["gpu"] = torch.cuda.get_device_name(0)
    env["command"] = " ".join(sys.argv)
    lines = [f"Host us per call, one layer (32 q / 8 kv heads, d 128, bf16, batch 1, {ctx} tokens held, "
             f"{args.preset}), median of 5 timings of {n} calls (DynamicLayer.update: 200 calls, its cache "
             "trimmed back first).", "", "| call | host us/call | timings |", "|---|---|---|"]
    lines += [f"| {r['case']} | {r['host_us_per_call']:.1f} | " + " ".join(f"{x:.1f}" for x in r["runs_us"]) + " |"
              for r in rows]
    for name, prof in profiles.items():
        lines += ["", f"cProfile of {name} (own us per call; the profiler inflates Python calls):", "",
                  "| function | calls | own us | cumulative us |", "|---|---|---|---|"]
        lines += [f"| `{r['function']}` | {r['calls']:.1f} | {r['own_us']:.1f} | {r['cum_us']:.1f} |"
                  for r in prof]
    out = Path(os.environ.get("OUT", args.out)) if args.out == "$OUT" else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_path.json").write_text(json.dumps({"environment": env, "rows": rows, "profiles": profiles}, indent=1))
    (out / "host_path.md").write_text("# host_path\n\n" + "\n".join(f"- {k}: {v}" for k, v in env.items())
                                      + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
