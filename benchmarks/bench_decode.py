"""Fused decode attention on the packed TurboQuant cache vs bf16 SDPA (one layer), on a CUDA GPU.

    python benchmarks/bench_decode.py --out DIR [--check] [--timing] [--big] [--e2e] [--quick]

--check   correctness: store bytes vs tq's NumPy reference; decode output vs float64
          attention over the dequantized cache (random and offset-key data)
--timing  32 query / 8 KV heads, d=128, contexts 4K/32K/128K, batch 1/8/32, presets
          K4/V4 K3/V3 K4/V2 K3/V2 (mma and fma kernels) vs torch SDPA on a bf16 cache of
          the same shape (enable_gqa, fastest backend), medians by triton do_bench
          (L2 flushed between runs)
--stream  a model's decode step as the GPU sees it: L distinct layers back to back in one
          CUDA graph, ms per layer for SDPA and the packed layers (beside per-call times)
--kernels per-kernel GPU time of a decode call (torch profiler) at a few shapes
--big     a cache over 4 GiB per section (64-bit offsets), checked against float64
--e2e     Llama-3-8B-shaped model with random weights: 128 greedy tokens after a
          32K prompt, tokens/s with PackedKVLayer vs transformers DynamicCache + SDPA

Writes decode_kernel.json / decode_kernel.md (and a log) under --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from _common import environment  # noqa: E402

HQ, HKV, D, WINDOW = 32, 8, 128, 128


def log(*a):
    print(*a, flush=True)


def bench(fn, rep_ms=100):
    import torch

    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    except ImportError:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        return float(np.median(ts))


def graph_bench(fn, rep_ms=100):
    """Median time of one replay of a CUDA graph holding fn() (no host launch cost)."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return bench(g.replay, rep_ms), g


def sdpa_best(q, k, v, rep_ms=100):
    """(ms, backend) of the fastest SDPA backend that runs q [B,32,1,128] over k,v [B,8,L,128]."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    res = {}
    for name, be in [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                     ("cudnn", SDPBackend.CUDNN_ATTENTION), ("default", None)]:
        try:
            if be is None:
                def fn():
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            else:
                def fn(be=be):
                    with sdpa_kernel(be):
                        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            out = fn()
            torch.cuda.synchronize()
            if not torch.isfinite(out).all():
                continue
            res[name] = bench(fn, rep_ms)
        except Exception as e:  # backend unavailable for this shape
            res[name] = None
            log(f"    sdpa {name}: unavailable ({type(e).__name__}: {str(e)[:80]})")
    ok = {k: v for k, v in res.items() if v is not None}
    best = min(ok, key=ok.get)
    try:  # graph replay of the default dispatch (GPU time without launch overhead)
        res["graph"], _g = graph_bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    except Exception as e:
        log(f"    sdpa graph: failed ({type(e).__name__}: {str(e)[:80]})")
    return ok[best], best, res


def fill_layer(layer, k, v, step=None):
    """Append a prefill; in pieces of `step` tokens when given (bounds temporary memory)."""
    t = k.shape[2]
    step = step or t
    for s in range(0, t, step):
        layer.append(k[:, :, s:s + step], v[:, :, s:s + step])


# ----------------------------------------------------------------------- check
def run_check(rows, quick=False):
    import torch

    import tq
    from tq.cuda import PRESETS, PackedKVLayer
    from tq.cuda.reference import attention, dequantize_layer, rel_err

    log("== correctness")
    rng = np.random.default_rng(0)
    lens = [20000, 4096, 700, 129, 1] if not quick else [3000, 129, 1]
    b = len(lens)
    for preset, (kb, vb) in PRESETS.items():
        for offset in (0.0, 4.0):
            t = max(lens)
            k = torch.randn(b, HKV, t, D, device="cuda")
            v = torch.randn(b, HKV, t, D, device="cuda")
            q = torch.randn(b, HQ, D, device="cuda")
            if offset:  # real-model-like keys: a large common offset, queries aligned with it
                mu = torch.randn(1, HKV, 1, D, device="cuda") * offset
                k = k + mu
                q = q + mu.repeat_interleave(HQ // HKV, 1)[:, :, 0] * 0.5
            k, v = k.bfloat16(), v.bfloat16()
            layer = PackedKVLayer(HKV, D, kb, vb, seed=7, window=WINDOW, batch=b, capacity=t + 64)
            layer.append(k[:, :, :t - 3], v[:, :, :t - 3], n_valid=[max(0, n - 3) for n in lens])
            for j in range(3):  # decode-style appends through the fused path
                idx = [n - 3 + j for n in lens]
                kk = torch.stack([k[i, :, max(x, 0)] for i, x in enumerate(idx)])[:, :, None]
                vv = torch.stack([v[i, :, max(x, 0)] for i, x in enumerate(idx)])[:, :, None]
                layer.append(kk, vv, n_valid=[1 if x >= 0 else 0 for x in idx])
            torch.cuda.synchronize()
            # store bytes vs tq's NumPy reference (a sample of rows of sequence 0)
            nc0 = lens[0] - WINDOW
            sel = np.sort(rng.choice(nc0, size=min(nc0, 512), replace=False))
            kq = tq.Quantizer.from_config(layer.key_config)
            x = k[0][:, sel].float().cpu().numpy().reshape(-1, D)
            ref = kq.compress(x).parts
            got = layer.kcodes[0][:, sel].cpu().numpy().reshape(-1, layer.ck)
            gotn = layer.knorms[0][:, sel].cpu().numpy().reshape(-1).view(np.uint16)
            store_ok = bool(np.array_equal(got, ref.codes) and np.array_equal(gotn, ref.norms.view(np.uint16)))
            vq = tq.Quantizer.from_config(layer.value_config)
            xv = v[0][:, sel].float().cpu().numpy().reshape(-1, D)
            refv = vq.compress(xv).parts
            store_ok &= bool(np.array_equal(layer.vcodes[0][:, sel].cpu().numpy().reshape(-1, layer.cv), refv.codes))
            K, V, ll = dequantize_layer(layer)
            refo = attention(q.double(), K, V, ll)
            for impl in ("mmt", "mma", "fma"):
                out = torch.full((b, HQ, D), float("nan"), device="cuda")
                layer.decode_attention(q, out=out, out_dtype=torch.float32, impl=impl)
                err = rel_err(out, refo)
                row = dict(kind="check", preset=preset, offset=offset, impl=impl, lens=lens,
                           rel_err=err, store_bytes_equal=store_ok)
                rows.append(row)
                log(f"  {preset} offset={offset} {impl}: rel_err={err:.2e} store_bytes_equal={store_ok}")
            del layer, K, V, k, v
            torch.cuda.empty_cache()
    # other head dims, n_rep and the bf16 query path
    for d in (64, 80, 96, 256):
        for kb, vb in ((4, 4), (3, 2)):
            ln = [5000, 300, 2]
            k = torch.randn(3, 4, max(ln), d, device="cuda").bfloat16()
            v = torch.randn(3, 4, max(ln), d, device="cuda").bfloat16()
            q = torch.randn(3, 16, d, device="cuda")
            layer = PackedKVLayer(4, d, kb, vb, seed=3, window=64, batch=3, capacity=max(ln))
            layer.append(k, v, n_valid=ln)
            K, V, ll = dequantize_layer(layer)
            refo = attention(q.double(), K, V, ll)
            for impl in ("mmt", "mma", "fma"):
                out = layer.decode_attention(q, out_dtype=torch.float32, impl=impl)
                err = rel_err(out, refo)
                rows.append(dict(kind="check", preset=f"K{kb}/V{vb}", head_dim=d, impl=impl, lens=ln, rel_err=err))
                log(f"  d={d} K{kb}/V{vb} {impl}: rel_err={err:.2e}")


def run_big(rows):
    """Sections over 4 GiB: 64 sequences x 8 heads x 135K rows x 64 B of K4 codes."""
    import torch

    from tq.cuda import PackedKVLayer
    from tq.cuda.reference import attention, dequantize_rows, rel_err

    log("== big (64-bit offsets)")
    b, t = 64, 17 * 8192
    layer = PackedKVLayer(HKV, D, 4, 4, seed=1, window=WINDOW, batch=b, capacity=t)
    log(f"  kcodes {layer.kcodes.numel() / 2**30:.2f} GiB")
    chunk = 8192
    kc = torch.randn(b, HKV, chunk, D, device="cuda").bfloat16()
    vc = torch.randn(b, HKV, chunk, D, device="cuda").bfloat16()
    for s in range(0, t, chunk):
        layer.append(torch.roll(kc, s // chunk, dims=0), torch.roll(vc, s // chunk, dims=0))
    q = torch.randn(b, HQ, D, device="cuda")
    outs = {impl: layer.decode_attention(q, out_dtype=torch.float32, impl=impl) for impl in ("mmt", "mma", "fma")}
    for i in (b - 1,):
        nc = t - WINDOW
        kp, vp = layer.key_config.plan(), layer.value_config.plan()
        K = dequantize_rows(kp, layer.kcodes[i, :, :nc], layer.knorms[i, :, :nc])
        V = dequantize_rows(vp, layer.vcodes[i, :, :nc], layer.vnorms[i, :, :nc])
        slots = torch.arange(nc, t, device="cuda") % WINDOW
        K = torch.cat([K, layer.kwin[i][:, slots].double()], 1)[None]
        V = torch.cat([V, layer.vwin[i][:, slots].double()], 1)[None]
        ref = attention(q[i:i + 1].double(), K, V, [t])
        for impl, o in outs.items():
            err = rel_err(o[i:i + 1], ref)
            rows.append(dict(kind="big", impl=impl, batch=b, tokens=t, seq=i, rel_err=err,
                             kcodes_gib=layer.kcodes.numel() / 2**30))
            log(f"  seq {i} {impl}: rel_err={err:.2e}")
    del layer
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------- timing
def use_variant(defines: str) -> None:
    """Compile-time variant of the decode kernels for the calls that follow."""
    from tq.cuda import _build

    _build.set_decode_defines(defines)


def parse_variants(text: str) -> tuple[tuple[str, str], ...]:
    """'base=;tile=-DTQ_TILE_SOURCE=1' -> (("base", ""), ("tile", "-DTQ_TILE_SOURCE=1"));
    empty: the build of the environment alone."""
    if not text.strip():
        return (("", os.environ.get("TQ_DECODE_DEFINES", "")),)
    out = []
    for item in text.split(";"):
        name, sep, defs = item.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"--variants: expected NAME=DEFINES, got {item!r}")
        out.append((name.strip(), defs.strip()))
    return tuple(out)


def run_timing(rows, contexts, batches, presets, impls, extra_impls=(), extra_at=(), variants=(("", ""),)):
    import torch

    from tq.cuda import PRESETS, PackedKVLayer
    from tq.cuda.layout import decode_bytes_read

    log("== timing")
    free, total = torch.cuda.mem_get_info()
    for ctx in contexts:
        for b in batches:
            need = 2 * b * HKV * ctx * D * 2
            if need > 0.55 * total:
                log(f"  skip ctx={ctx} B={b}: bf16 cache {need / 2**30:.1f} GiB does not fit with the rest")
                rows.append(dict(kind="skip", ctx=ctx, batch=b, reason=f"bf16 cache {need / 2**30:.1f} GiB"))
                continue
            k = torch.randn(b, HKV, ctx, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(b, HKV, ctx, D, device="cuda", dtype=torch.bfloat16)
            q = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
            t_sdpa, be, allbe = sdpa_best(q, k, v)
            sdpa_bytes = 2 * b * HKV * ctx * D * 2
            rows.append(dict(kind="sdpa", ctx=ctx, batch=b, ms=t_sdpa, backend=be, all=allbe,
                             bytes=sdpa_bytes, gbps=sdpa_bytes / t_sdpa / 1e6))
            log(f"  ctx={ctx} B={b}: SDPA {t_sdpa:.4f} ms ({be}) {sdpa_bytes / t_sdpa / 1e6:.0f} GB/s")
            for preset in presets:
                kb, vb = PRESETS[preset]
                use_variant(variants[0][1])  # the cache is filled and the reference taken with the first
                layer = PackedKVLayer(HKV, D, kb, vb, seed=1, window=WINDOW, batch=b, capacity=ctx + 64)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fill_layer(layer, k, v)
                torch.cuda.synchronize()
                t_fill = time.perf_counter() - t0
                nbytes = decode_bytes_read([ctx] * b, WINDOW, HKV, D, kb, vb)
                qf = q[:, :, 0]
                ref = layer.decode_attention(qf, out_dtype=torch.float32, impl="fma")
                these = list(impls) + ([i for i in extra_impls] if (ctx, b) in extra_at else [])
                # variants are timed one after the other on the same layer and inputs, in
                # alternating order from one configuration to the next (no systematic first)
                order = variants if len(rows) % 2 == 0 else variants[::-1]
                for impl, (vname, vdefs) in ((i, v) for i in these for v in order):
                    vindex = variants.index((vname, vdefs))
                    use_variant(vdefs)
                    label = f"{impl} [{vname}]" if vname else impl
                    out = torch.empty(b, HQ, D, device="cuda", dtype=torch.bfloat16)

                    def fn(impl=impl, out=out):
                        return layer.decode_attention(qf, out=out, impl=impl)
                    fn()
                    torch.cuda.synchronize()
                    dev = float((out.float() - ref).norm() / ref.norm())
                    ms = bench(fn)
                    try:
                        ms_graph, _g = graph_bench(fn)
                        del _g
                    except Exception as e:
                        ms_graph = None
                        log(f"    graph capture failed: {type(e).__name__}: {str(e)[:100]}")
                    # host-side cost of one call (launch overhead), wall clock
                    torch.cuda.synchronize()
                    t1 = time.perf_counter()
                    for _ in range(50):
                        fn()
                    host_us = (time.perf_counter() - t1) / 50 * 1e6
                    torch.cuda.synchronize()
                    rows.append(dict(kind="tq", ctx=ctx, batch=b, preset=preset, impl=label, kernel=impl, variant_name=vname, variant=vdefs, variant_index=vindex, ms=ms,
                                     bytes=nbytes, gbps=nbytes / ms / 1e6, speedup=t_sdpa / ms,
                                     sdpa_ms=t_sdpa, ms_graph=ms_graph, sdpa_graph_ms=allbe.get("graph"),
                                     rel_dev_vs_fma=dev, host_us_per_call=host_us,
                                     fill_s=t_fill, nbytes_alloc=layer.nbytes()))
                    gtxt = f"graph {ms_graph:.4f} ms" if ms_graph else "graph -"
                    log(f"    {preset} {label}: {ms:.4f} ms  {nbytes / ms / 1e6:.0f} GB/s  x{t_sdpa / ms:.2f} vs SDPA  {gtxt}"
                        f"  (dev vs fma {dev:.1e}, host {host_us:.0f} us/call, fill {t_fill:.2f} s)")
                use_variant(variants[0][1])
                # decode-step append (T=1) cost
                k1 = torch.randn(b, HKV, 1, D, device="cuda", dtype=torch.bfloat16)
                layer.reset()
                fill_layer(layer, k[:, :, :ctx - 64], v[:, :, :ctx - 64])
                ms_app = bench(lambda: (layer.append(k1, k1), layer.lengths.sub_(1),
                                        layer._host_len.__isub__(1)), rep_ms=50)
                rows.append(dict(kind="append1", ctx=ctx, batch=b, preset=preset, ms=ms_app))
                log(f"    {preset} append(T=1): {ms_app * 1000:.1f} us")
                del layer
                torch.cuda.empty_cache()
            del k, v
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------- stream
def stream_layer_count(compressed_bytes: int, bf16_bytes: int, l2_bytes: int, free_bytes: int,
                       lo: int = 4, hi: int = 32) -> int:
    """Layers for a back-to-back stream: enough that the compressed caches together are 4x the
    L2 (no layer finds its bytes still cached), at most `hi`, and the bf16 caches within half of
    the free memory (0 when not even 2 fit)."""
    want = min(hi, max(lo, math.ceil(4 * l2_bytes / max(1, compressed_bytes))))
    fit = int(0.5 * free_bytes // max(1, bf16_bytes))
    return min(want, fit) if fit >= 2 else 0


def run_stream(rows, contexts, batches, presets, impl="auto"):
    """A model's decode step as the GPU runs it: L distinct layers' attention back to back in one
    CUDA graph, per-layer time = replay / L, for SDPA on bf16 caches and for the packed layers,
    side by side with the per-call do_bench time of the first layer (which adds the timer's
    fixed cost of one isolated op to both sides)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    from tq.cuda import PRESETS, PackedKVLayer
    from tq.cuda.layout import decode_bytes_read

    log("== stream (L layers back to back in one CUDA graph)")
    props = torch.cuda.get_device_properties(0)
    l2 = int(getattr(props, "L2_cache_size", 50 << 20))

    def graph_of(calls):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for c in calls:
                c()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for c in calls:
                c()
        torch.cuda.synchronize()
        return g

    for ctx in contexts:
        for b in batches:
            bf16_bytes = 2 * b * HKV * ctx * D * 2
            small = min(decode_bytes_read([ctx] * b, WINDOW, HKV, D, *PRESETS[p]) for p in presets)
            nl = stream_layer_count(small, bf16_bytes, l2, torch.cuda.mem_get_info()[0])
            if nl == 0:
                log(f"  skip ctx={ctx} B={b}: two bf16 caches do not fit")
                continue
            ks = [torch.randn(b, HKV, ctx, D, device="cuda", dtype=torch.bfloat16) for _ in range(nl)]
            vs = [torch.randn(b, HKV, ctx, D, device="cuda", dtype=torch.bfloat16) for _ in range(nl)]
            q = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
            t_sdpa_call, be, _ = sdpa_best(q, ks[0], vs[0])
            backend = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                       "cudnn": "CUDNN_ATTENTION"}.get(be)

            def sdpa(i):
                def fn():
                    if backend is None:
                        return F.scaled_dot_product_attention(q, ks[i], vs[i], enable_gqa=True)
                    with sdpa_kernel(getattr(torch.nn.attention.SDPBackend, backend)):
                        return F.scaled_dot_product_attention(q, ks[i], vs[i], enable_gqa=True)
                return fn
            g_sdpa = graph_of([sdpa(i) for i in range(nl)])
            t_sdpa = bench(g_sdpa.replay) / nl
            rows.append(dict(kind="stream", ctx=ctx, batch=b, cache="bf16", impl=f"SDPA ({be})", layers=nl,
                             ms=t_sdpa, ms_call=t_sdpa_call, bytes=bf16_bytes, gbps=bf16_bytes / t_sdpa / 1e6))
            log(f"  ctx={ctx} B={b} L={nl}: SDPA {t_sdpa:.4f} ms/layer in the stream, {t_sdpa_call:.4f} ms per call ({be})")
            for preset in presets:
                kb, vb = PRESETS[preset]
                layers = []
                for i in range(nl):
                    lay = PackedKVLayer(HKV, D, kb, vb, seed=1, window=WINDOW, batch=b, capacity=ctx + 64)
                    fill_layer(lay, ks[i], vs[i], step=16384)
                    layers.append(lay)
                qf = q[:, :, 0]
                outs = [torch.empty(b, HQ, D, device="cuda", dtype=torch.bfloat16) for _ in range(nl)]
                calls = [lambda i=i: layers[i].decode_attention(qf, out=outs[i], impl=impl) for i in range(nl)]
                t_call = bench(calls[0])
                g = graph_of(calls)
                ms = bench(g.replay) / nl
                del g
                nbytes = decode_bytes_read([ctx] * b, WINDOW, HKV, D, kb, vb)
                rows.append(dict(kind="stream", ctx=ctx, batch=b, cache=preset, impl=impl, layers=nl, ms=ms,
                                 ms_call=t_call, bytes=nbytes, gbps=nbytes / ms / 1e6,
                                 speedup=t_sdpa / ms, speedup_call=t_sdpa_call / t_call))
                log(f"    {preset}: {ms:.4f} ms/layer in the stream, x{t_sdpa / ms:.2f} vs SDPA; per call {t_call:.4f} ms,"
                    f" x{t_sdpa_call / t_call:.2f}")
                del layers, outs, calls
                torch.cuda.empty_cache()
            # SDPA again after the packed layers: the ratios above use its faster time of the two
            sd = next(r for r in reversed(rows) if r["kind"] == "stream" and r["cache"] == "bf16")
            sd["ms_after"] = bench(g_sdpa.replay) / nl
            if sd["ms_after"] < sd["ms"]:
                for r in rows:
                    if r["kind"] == "stream" and (r["ctx"], r["batch"]) == (ctx, b) and "speedup" in r:
                        r["speedup"] = sd["ms_after"] / r["ms"]
            log(f"  SDPA again: {sd['ms_after']:.4f} ms/layer in the stream")
            del g_sdpa, ks, vs
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------- kernels
def run_kernels(rows, configs=((4096, 1), (32768, 1), (32768, 8), (131072, 8)),
                presets=("K4/V4", "K3/V2"), calls=20):
    """GPU time of each kernel of a decode call (torch profiler, CUPTI), median over calls."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tq.cuda import PRESETS, PackedKVLayer
    from tq.cuda._build import decode_defines

    log("== kernels (per-kernel GPU time of one decode call)")
    for ctx, b in configs:
        k = torch.randn(b, HKV, ctx, D, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(b, HQ, D, device="cuda", dtype=torch.bfloat16)
        for preset in presets:
            kb, vb = PRESETS[preset]
            layer = PackedKVLayer(HKV, D, kb, vb, seed=1, window=WINDOW, batch=b, capacity=ctx + 64)
            fill_layer(layer, k, k, step=8192)
            out = torch.empty(b, HQ, D, device="cuda", dtype=torch.bfloat16)
            for _ in range(5):
                layer.decode_attention(q, out=out)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    layer.decode_attention(q, out=out)
                torch.cuda.synchronize()
            per = {}
            for ev in prof.events():
                if ev.device_type.name == "CUDA":
                    name = ev.name.split("<")[0].replace("void ", "")
                    per.setdefault(name, []).append(ev.device_time if hasattr(ev, "device_time") else ev.cuda_time)
            med = {n: float(np.median(v)) for n, v in per.items()}
            regs = {}
            try:
                mod = layer._module("decode", HQ // HKV)
                for kname in ("mma", "fma"):
                    kf = mod.kernels[kname]
                    regs[kname] = dict(regs=int(kf.num_regs), local=int(kf.local_size_bytes))
            except Exception as e:  # attribute names differ across CuPy versions
                regs["error"] = f"{type(e).__name__}: {e}"
            rows.append(dict(kind="kernels", ctx=ctx, batch=b, preset=preset, us=med, regs=regs,
                             defines=" ".join(decode_defines())))
            log(f"  ctx={ctx} B={b} {preset}: " + ", ".join(f"{n} {t:.1f} us" for n, t in med.items()) + f"  {regs}")
            del layer
        del k
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------- e2e
def run_e2e(rows, layers=32, prompt=32768, gen=128, presets=("K4/V4", "K3/V2")):
    """Llama-3-8B shape (hidden 4096, 32/8 heads, d 128, MLP 14336, vocab 128256), random weights."""
    import torch
    import torch.nn.functional as F

    from tq.cuda import PRESETS, PackedKVLayer, max_context

    log("== e2e")
    torch.manual_seed(0)
    hid, inter, vocab, dt = 4096, 14336, 128256, torch.bfloat16
    dev = "cuda"

    def w(*s):
        return (torch.randn(*s, device=dev, dtype=dt) / math.sqrt(s[-1]))

    emb = w(vocab, hid)
    lm = w(vocab, hid)
    L = [dict(qkv=w((HQ + 2 * HKV) * D, hid), o=w(hid, HQ * D), gu=w(2 * inter, hid), dn=w(hid, inter),
              n1=torch.ones(hid, device=dev, dtype=dt), n2=torch.ones(hid, device=dev, dtype=dt))
         for _ in range(layers)]
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D))

    def rope(x, pos):  # x [B, H, T, D]
        f = pos[:, None].float() * inv[None]
        cos, sin = f.cos().to(x.dtype), f.sin().to(x.dtype)
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    def rms(x, g):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(dt) * g

    def forward(ids, pos, attend):
        x = emb[ids]  # [1, T, hid]
        for li, p in enumerate(L):
            h = rms(x, p["n1"])
            qkv = h @ p["qkv"].T
            t = ids.shape[1]
            q, k, v = qkv.split([HQ * D, HKV * D, HKV * D], -1)
            q = rope(q.view(1, t, HQ, D).transpose(1, 2), pos)
            k = rope(k.view(1, t, HKV, D).transpose(1, 2), pos)
            v = v.view(1, t, HKV, D).transpose(1, 2)
            a = attend(li, q, k, v)  # [1, HQ, T, D]
            x = x + a.transpose(1, 2).reshape(1, t, HQ * D) @ p["o"].T
            h = rms(x, p["n2"])
            g, u = (h @ p["gu"].T).chunk(2, -1)
            x = x + (F.silu(g) * u) @ p["dn"].T
        return (x[:, -1] @ lm.T).argmax(-1)

    ids = torch.randint(0, vocab, (1, prompt), device=dev)

    def generate(make_attend):
        attend = make_attend()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tok = forward(ids, torch.arange(prompt, device=dev), attend)
        torch.cuda.synchronize()
        t_pre = time.perf_counter() - t0
        toks = [tok]
        t0 = time.perf_counter()
        for i in range(gen - 1):
            tok = forward(tok[:, None], torch.tensor([prompt + i], device=dev), attend)
            toks.append(tok)
        torch.cuda.synchronize()
        t_gen = time.perf_counter() - t0
        return t_pre, (gen - 1) / t_gen, torch.stack(toks, 1)

    def bf16_dynamic():
        from transformers import DynamicCache

        cache = DynamicCache()

        def attend(li, q, k, v):
            kk, vv = cache.update(k, v, li)
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=q.shape[2] > 1, enable_gqa=True)
        return attend

    def tq_cache(kb, vb):
        def make():
            layers_ = [PackedKVLayer(HKV, D, kb, vb, seed=li, window=WINDOW, batch=1,
                                     capacity=prompt + gen + 64) for li in range(layers)]

            def attend(li, q, k, v):
                lay = layers_[li]
                if q.shape[2] > 1:  # prefill: exact attention on the prompt, then compress it
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                    lay.append(k, v)
                    return out
                lay.append(k, v)
                return lay.decode_attention(q, scaling=1 / math.sqrt(D))
            return attend
        return make

    res = {}
    for name, mk in [("bf16 DynamicCache+SDPA", bf16_dynamic)] + [(p, tq_cache(*PRESETS[p])) for p in presets]:
        try:
            t_pre, tps, toks = generate(mk)
            res[name] = toks
            same = None if name.startswith("bf16") else float((toks == res["bf16 DynamicCache+SDPA"]).float().mean())
            rows.append(dict(kind="e2e", cache=name, layers=layers, prompt=prompt, gen=gen,
                             prefill_s=t_pre, tokens_per_s=tps, same_tokens_as_bf16=same))
            log(f"  {name}: prefill {t_pre:.2f} s, decode {tps:.1f} tok/s, same tokens as bf16 {same}")
        except Exception as e:
            log(f"  {name}: failed {type(e).__name__}: {e}")
            rows.append(dict(kind="e2e", cache=name, error=f"{type(e).__name__}: {e}"))
        torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    wbytes = sum(t.numel() * 2 for p in L for t in p.values()) + 2 * emb.numel() * 2
    free_for_cache = total - wbytes - 6 * 2**30  # activations/workspace margin
    for name, bits in [("bf16", (None, None))] + [(p, PRESETS[p]) for p in PRESETS]:
        c = max_context(free_for_cache, num_layers=layers, num_kv_heads=HKV, head_dim=D,
                        key_bits=bits[0], value_bits=bits[1])
        rows.append(dict(kind="maxctx", cache=name, layers=layers, tokens=c, free_gib=free_for_cache / 2**30))
        log(f"  longest context, batch 1, {name}: {c} tokens ({free_for_cache / 2**30:.1f} GiB for the cache)")


# ----------------------------------------------------------------------- report
def variant_ratios(rows) -> list[str]:
    """Time of the first variant over each other variant's, per configuration (side by side in
    one run, on the same layer and inputs); empty without --variants."""
    groups: dict = {}
    for r in rows:
        if r["kind"] == "tq" and r.get("variant_name"):
            groups.setdefault((r["ctx"], r["batch"], r["preset"], r["kernel"]), []).append(r)
    if not groups:
        return []
    out = ["", "| context | batch | cache | kernel | variant | time (ms) | first variant / this |", "|---|---|---|---|---|---|---|"]
    for (ctx, b, preset, impl), vs in groups.items():
        vs.sort(key=lambda r: r["variant_index"])
        base = vs[0]["ms"]
        for r in vs:
            out.append(f"| {ctx} | {b} | {preset} | {impl} | {r['variant_name']} | {r['ms']:.4f} | {base / r['ms']:.3f} |")
    return out


def markdown(env, rows):
    out = ["| context | batch | cache | kernel | time (ms) | GB/s | speed-up vs SDPA | graph replay (ms) | speed-up, both graphed |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "sdpa":
            gm = r["all"].get("graph")
            out.append(f"| {r['ctx']} | {r['batch']} | bf16 | SDPA ({r['backend']}) | {r['ms']:.4f} | {r['gbps']:.0f} | 1.00 | "
                       f"{gm if gm is None else format(gm, '.4f')} | 1.00 |")
        elif r["kind"] == "tq":
            mg, sg = r.get("ms_graph"), r.get("sdpa_graph_ms")
            gs = f"{min(sg, r['sdpa_ms']) / mg:.2f}" if (mg and sg) else "–"
            out.append(f"| {r['ctx']} | {r['batch']} | {r['preset']} | {r['impl']} | {r['ms']:.4f} | {r['gbps']:.0f} | {r['speedup']:.2f} | "
                       f"{mg if mg is None else format(mg, '.4f')} | {gs} |")
        elif r["kind"] == "skip":
            out.append(f"| {r['ctx']} | {r['batch']} | – | skipped: {r['reason']} | | | | | |")
    out += variant_ratios(rows)
    checks = [r for r in rows if r["kind"] in ("check", "big")]
    if checks:
        out += ["", "| check | kernel | rel. error vs float64 | store bytes = reference |", "|---|---|---|---|"]
        for r in checks:
            what = r.get("preset", "") + (f" d={r['head_dim']}" if "head_dim" in r else "") + \
                (f" offset={r['offset']}" if "offset" in r else "") + (" >4GiB" if r["kind"] == "big" else "")
            out.append(f"| {what} | {r['impl']} | {r['rel_err']:.2e} | {r.get('store_bytes_equal', '')} |")
    ker = [r for r in rows if r["kind"] == "kernels"]
    if ker:
        out += ["", "| per-kernel GPU time (torch profiler, median of 20 calls) | µs |", "|---|---|"]
        for r in ker:
            out.append(f"| {r['ctx']} x {r['batch']} {r['preset']} | " + ", ".join(f"{n} {t:.1f}" for n, t in r["us"].items()) + " |")
    stream = [r for r in rows if r["kind"] == "stream"]
    if stream:
        out += ["", "Back to back (`--stream`): L distinct layers' attention in one CUDA graph, time per layer "
                "(replay / L); SDPA timed before and after the packed layers, the faster one counts. Per call: "
                "do_bench of one isolated call, as in the table above.", "",
                "| context | batch | cache | kernel | layers | ms/layer | GB/s | speed-up | per call (ms) | speed-up per call |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in stream:
            if r["cache"] == "bf16":
                both = f"{r['ms']:.4f}" + (f" / {r['ms_after']:.4f}" if "ms_after" in r else "")
                out.append(f"| {r['ctx']} | {r['batch']} | bf16 | {r['impl']} | {r['layers']} | {both} | "
                           f"{r['gbps']:.0f} | 1.00 | {r['ms_call']:.4f} | 1.00 |")
            else:
                out.append(f"| {r['ctx']} | {r['batch']} | {r['cache']} | {r['impl']} | {r['layers']} | {r['ms']:.4f} | "
                           f"{r['gbps']:.0f} | {r['speedup']:.2f} | {r['ms_call']:.4f} | {r['speedup_call']:.2f} |")
    e2e = [r for r in rows if r["kind"] in ("e2e", "maxctx")]
    if e2e:
        out += ["", "| end to end | value |", "|---|---|"]
        for r in e2e:
            if r["kind"] == "e2e" and "tokens_per_s" in r:
                out.append(f"| {r['cache']}: {r['layers']} layers, {r['prompt']} prompt, decode tok/s | {r['tokens_per_s']:.1f} (prefill {r['prefill_s']:.1f} s) |")
            elif r["kind"] == "maxctx":
                out.append(f"| longest context, {r['cache']} ({r['layers']} layers, batch 1) | {r['tokens']} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--timing", action="store_true")
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--e2e", action="store_true")
    ap.add_argument("--stream", action="store_true",
                    help="layers back to back in one CUDA graph (--contexts, --batches, --presets)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--presets", default="K4/V4,K3/V3,K4/V2,K3/V2")
    ap.add_argument("--impls", default="auto,mmt,mma,fma")
    ap.add_argument("--extra-impls", default="mma_v1", help="also timed at --extra-at (version notes)")
    ap.add_argument("--extra-at", default="32768:8,131072:1,131072:8")
    ap.add_argument("--variants", default="",
                    help="compile-time variants timed side by side, 'NAME=DEFINES;NAME=DEFINES' "
                         "(e.g. 'base=;tile=-DTQ_TILE_SOURCE=1'); the first is the reference")
    ap.add_argument("--e2e-layers", type=int, default=32)
    ap.add_argument("--stem", default="decode_kernel")
    ap.add_argument("--profile", action="store_true", help="one decode per preset/impl (for ncu)")
    ap.add_argument("--profile-at", default="32768:8", help="context:batch of --profile")
    ap.add_argument("--kernels", action="store_true", help="per-kernel GPU time (torch profiler)")
    a = ap.parse_args()
    import torch

    env = environment(("torch", "triton", "cupy", "transformers"))
    env["gpu"] = torch.cuda.get_device_name(0)
    env["cuda"] = torch.version.cuda
    env["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
    log(json.dumps(env))
    rows = []
    os.makedirs(a.out, exist_ok=True)

    def save():
        with open(os.path.join(a.out, f"{a.stem}.json"), "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
        md = markdown(env, rows)
        head = "\n".join(f"- {k}: {v}" for k, v in env.items())
        with open(os.path.join(a.out, f"{a.stem}.md"), "w") as f:
            f.write(f"# Fused decode attention on the packed cache\n\n{head}\n\n{md}\n")
        return md

    if a.profile:
        from tq.cuda import PRESETS, PackedKVLayer
        for preset in a.presets.split(","):
            kb, vb = PRESETS[preset]
            ctx, bsz = (int(x) for x in a.profile_at.split(":"))
            k = torch.randn(bsz, HKV, ctx, D, device="cuda", dtype=torch.bfloat16)
            lay = PackedKVLayer(HKV, D, kb, vb, window=WINDOW, batch=bsz, capacity=ctx)
            lay.append(k, k)
            q = torch.randn(bsz, HQ, D, device="cuda", dtype=torch.bfloat16)
            for impl in a.impls.split(","):
                lay.decode_attention(q, impl=impl)
            torch.cuda.synchronize()
        return
    try:
        if a.kernels:
            run_kernels(rows)
            save()
        if a.check:
            run_check(rows, a.quick)
            save()
        if a.timing:
            run_timing(rows, [int(x) for x in a.contexts.split(",")], [int(x) for x in a.batches.split(",")],
                       a.presets.split(","), a.impls.split(","), [x for x in a.extra_impls.split(",") if x],
                       [tuple(int(y) for y in x.split(":")) for x in a.extra_at.split(",") if x],
                       parse_variants(a.variants))
            save()
        if a.stream:
            run_stream(rows, [int(x) for x in a.contexts.split(",")], [int(x) for x in a.batches.split(",")],
                       a.presets.split(","))
            save()
        if a.e2e:
            run_e2e(rows, layers=a.e2e_layers)
            save()
        if a.big:
            run_big(rows)
        from tq.cuda.layer import PackedKVLayer
        env["launch_mode"] = PackedKVLayer.launch_mode
    finally:
        log(save())


if __name__ == "__main__":
    main()
