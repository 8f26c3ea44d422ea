"""End-to-end decode speed on CUDA: model.generate with TurboQuantCache (fused kernels) vs DynamicCache.

    python benchmarks/bench_hf_cuda.py [--context 32768] [--new 64] [--layers 8] [--graphs] [--out DIR]

Random weights in the Llama-3-8B shape (hidden 4096, 32 query / 8 KV heads,
head_dim 128), ``--layers`` of them: speed does not depend on the weights.
Decode time per token = (time of generate(new + 1) - time of generate(1)) / new,
median of ``--reps`` repetitions interleaved across the caches, after one full-length
warm-up of each (allocator pool, kernel compilation). ``--host-profile`` adds the host
(CPU) time of a decode step by part: the model's forward, its attention modules, the
cache's update and the fused attention call. ``--graphs`` adds the decode steps replayed
from a CUDA graph (tq.hf.CudaGraphDecoder) for TurboQuantCache and, as the bf16 baseline,
StaticCache; and a bf16 flash-SDPA reference: StaticCache replayed with unmasked flash SDPA over
its whole preallocated buffer at decode (the bytes and kernel of a correct bf16 flash-decoding step
over a static cache, not its result: the masked SDPA that transformers runs on a StaticCache cannot
use the flash kernel). It is one fast bf16 implementation, not a lower bound on bf16 time (results
files from 2026-12-07 call it "bf16 speed bound"). Writes hf_cuda_decode_b{batch}.{md,json}
to --out (default benchmarks/results).
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
import tq.hf  # noqa: E402
from _common import profile_rows  # noqa: E402
from tq.hf import TurboQuantCache  # noqa: E402


def build(layers):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                      rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    return model


REF_ATTN = "tq_bench_bf16_flash_ref"
STATIC_NAME = "StaticCache bf16 + SDPA, CUDA graph"
REF_NAME = "bf16 flash-SDPA reference (StaticCache, unmasked), CUDA graph"


def register_reference_attention():
    """The bf16 flash-SDPA reference's attention: transformers' SDPA at prefill; at decode, flash SDPA
    over the whole static buffer, mask ignored (zero slots beyond the length are attended too:
    same bytes and kernel as a correct flash-decoding step, wrong result; timing only)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def flash_ref(module, query, key, value, attention_mask, scaling=None, **kwargs):
        if query.shape[2] != 1:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        b, hq, _, d = query.shape
        q = query.reshape(b, key.shape[1], hq // key.shape[1], d)   # GQA: a group's heads as its queries
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(q, key, value, scale=scaling)
        return out.reshape(b, hq, 1, d).transpose(1, 2), None

    AttentionInterface.register(REF_ATTN, flash_ref)


#: tokens of the short graphed run: prefill, two warm-up steps, the capture, one replay
GRAPH_SHORT = 4


def cache_size(cache, batch, layers):
    """(bytes held now, asymptotic bytes per generated token) of a cache after a run."""
    if isinstance(cache, TurboQuantCache):
        return cache.nbytes(), cache.compressed_bytes_per_token() * batch
    nbytes = sum(l.keys.numel() * 2 + l.values.numel() * 2 for l in cache.layers)  # StaticCache: all allocated
    return nbytes, layers * 8 * 128 * 2 * 2 * batch


def timed_generate(model, ids, new, make_cache, keep=False, graph_len=None, attn="sdpa"):
    """Seconds of one generation of ``new`` tokens (model.generate; with ``graph_len``,
    tq.hf.CudaGraphDecoder planned for that length); with ``keep``, also the cache's size
    (the cache itself is dropped before returning: holding one per configuration ran
    batch 8 out of memory). ``attn``: the attention implementation of a bf16 cache."""
    cache = make_cache()
    if isinstance(cache, TurboQuantCache):
        tq.hf.enable(model, cache)
    else:
        tq.hf.disable(model, attn)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        if graph_len is None:
            model.generate(ids, past_key_values=cache, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        else:
            tq.hf.CudaGraphDecoder(model, cache, max_length=graph_len).generate(ids, new)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    size = cache_size(cache, ids.shape[0], model.config.num_hidden_layers) if keep else None
    del cache
    return dt, size


class _HostClock:
    """Accumulated host seconds of wrapped callables (no device sync: CPU cost only)."""

    def __init__(self):
        self.total: dict[str, float] = {}

    def wrap(self, key, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total[key] = self.total.get(key, 0.0) + time.perf_counter() - t0
        return timed


def profile_steps(model, cache, tok, steps, top=30):
    """cProfile of ``steps`` decode steps: the ``top`` functions by own time, per step."""
    state = {"tok": tok}

    def step():
        out = model(state["tok"], past_key_values=cache, use_cache=True, logits_to_keep=1)
        state["tok"] = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()

    with torch.no_grad():
        return profile_rows(step, steps, top)


def host_profile(model, ids, makers, steps):
    """Host ms per decode step in the model's forward, its attention modules, the cache's update
    and (fused layers) the attention call, measured by wrapping them on the instances."""
    res = {"steps": steps, "caches": {}}
    attn_mods = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    for name, mk in makers.items():
        cache = mk()
        if isinstance(cache, TurboQuantCache):
            tq.hf.enable(model, cache)
        else:
            tq.hf.disable(model)
        with torch.no_grad():
            out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
        clock = _HostClock()
        saved = [(m, m.forward) for m in attn_mods]
        for m in attn_mods:
            m.forward = clock.wrap("attn", m.forward)
        cache.update = clock.wrap("update", cache.update)
        for lay in cache.layers:
            if hasattr(lay, "attend"):
                lay.attend = clock.wrap("attend", lay.attend)
        fwd = clock.wrap("forward", model.forward)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(steps):
                out = fwd(tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
                tok = out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
        for m, f in saved:
            m.forward = f
        res["caches"][name] = {"wall": wall * 1e3, **{k: v / steps * 1e3 for k, v in clock.total.items()}}
        res.setdefault("profile", {})[name] = profile_steps(model, cache, tok, steps)
        print(f"host {name}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in res["caches"][name].items()), flush=True)
        del cache, out
        torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--host-profile", action="store_true",
                    help="also: host (CPU) time per decode step spent in the model, attention modules, cache")
    ap.add_argument("--graphs", action="store_true",
                    help="also: decode steps replayed from a CUDA graph (tq.hf.CudaGraphDecoder), StaticCache as "
                         "the bf16 baseline")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    model = build(args.layers)
    ids = torch.randint(0, 32000, (args.batch, args.context), device="cuda")
    cap = args.context + args.new + 16
    configs = {
        "DynamicCache bf16 + SDPA": lambda: None,
        "TurboQuantCache K4V4 fused": lambda: TurboQuantCache(model.config, "K4V4", sinks=0, fused=True, capacity=cap),
        "TurboQuantCache K3V2 fused": lambda: TurboQuantCache(model.config, "K3V2", sinks=0, fused=True, capacity=cap),
    }
    makers = {name: ((lambda: __import__("transformers").DynamicCache()) if make() is None else make)
              for name, make in configs.items()}
    graphed = {}
    if args.graphs:  # the same step replayed from a CUDA graph: StaticCache is the bf16 baseline there
        from transformers import StaticCache
        def static():
            return StaticCache(config=model.config, max_cache_len=cap)
        graphed = {STATIC_NAME: static, REF_NAME: static,
                   "TurboQuantCache K4V4 fused, CUDA graph": makers["TurboQuantCache K4V4 fused"],
                   "TurboQuantCache K3V2 fused, CUDA graph": makers["TurboQuantCache K3V2 fused"]}
    # graphed runs: the first 1 + GRAPH_SHORT tokens (prefill, warm-up, capture, one replay) are
    # timed apart, so the difference is replays only
    short = {**{n: 1 for n in makers}, **{n: GRAPH_SHORT for n in graphed}}
    glen = {**{n: None for n in makers}, **{n: cap for n in graphed}}
    allm = {**makers, **graphed}
    attn = {n: REF_ATTN if n == REF_NAME else "sdpa" for n in allm}
    if args.graphs:
        register_reference_attention()
    # Warm-up per cache at the full size: compilation, and the caching allocator's pool (the
    # first full-length run of DynamicCache grows it by one block per step and layer, which
    # made a first repetition 4x slower than the next in earlier runs of this script).
    for name, mk in list(allm.items()):
        try:
            timed_generate(model, ids[:1, :1024], 8, mk, graph_len=None if glen[name] is None else 1100,
                           attn=attn[name])
            timed_generate(model, ids, args.new + 1, mk, graph_len=glen[name], attn=attn[name])
        except Exception as e:  # a graphed configuration that fails is reported, not fatal
            if glen[name] is None:
                raise
            import traceback
            traceback.print_exc()
            print(f"dropped {name}: {type(e).__name__}: {e}", flush=True)
            del allm[name]
            torch.cuda.empty_cache()
    # Repetitions interleaved across the caches (A B C A B C ...), so drift hits all alike.
    runs = {name: [] for name in allm}
    sizes = {}
    for _ in range(args.reps):
        for name, mk in allm.items():
            t1, _ = timed_generate(model, ids, short[name], mk, graph_len=glen[name], attn=attn[name])
            tn, sizes[name] = timed_generate(model, ids, args.new + 1, mk, keep=True, graph_len=glen[name],
                                             attn=attn[name])
            runs[name].append((tn - t1) / (args.new + 1 - short[name]))
    rows = []
    for name, (nbytes, per_token) in sizes.items():
        per_tok = runs[name]
        ms = statistics.median(per_tok) * 1e3
        rows.append(dict(cache=name, decode_ms_per_token=ms, tokens_per_s=1e3 / ms, cache_bytes=nbytes,
                         bytes_per_token_asymptotic=per_token, runs_ms=[x * 1e3 for x in per_tok]))
        print(f"{name:<30} {ms:8.3f} ms/token  {1e3 / ms:7.1f} tok/s  cache {nbytes / 2**20:8.1f} MiB  "
              f"{per_token} B/token  runs {' '.join(f'{x * 1e3:.2f}' for x in per_tok)}", flush=True)
    torch.cuda.empty_cache()
    host = host_profile(model, ids, makers, min(args.new, 32)) if args.host_profile else {}
    base = rows[0]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    free = torch.cuda.get_device_properties(0).total_memory * 0.9 - weights
    lines = [f"End-to-end decode, {args.layers} layers of Llama-3-8B shape (random weights, bf16), batch {args.batch}, "
             f"{args.context}-token prompt, {args.new} new tokens, median of {args.reps} repetitions interleaved "
             f"across the caches after a full-length warm-up of each.", "",
             "Speed-up: against DynamicCache (eager, what model.generate runs); graphed rows also against "
             "StaticCache replayed from a CUDA graph the same way (transformers' masked SDPA), and against "
             "the bf16 flash-SDPA reference (graphed StaticCache with unmasked flash SDPA over the whole buffer: the "
             "bytes of a correct bf16 flash-decoding step, timing only). Graphed "
             f"ms/token: replays only (a run of {args.new + 1} tokens minus one of {GRAPH_SHORT}).", "",
             "| cache | ms/token | tokens/s | speed-up | vs graphed StaticCache | vs bf16 flash reference | cache bytes | bytes/token | max context per sequence in 90% of GPU memory | runs (ms/token) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    gbase = next((r for r in rows if r["cache"] == STATIC_NAME), None)
    ref = next((r for r in rows if r["cache"] == REF_NAME), None)
    for r in rows:
        r["speedup"] = base["decode_ms_per_token"] / r["decode_ms_per_token"]
        r["graph"] = "CUDA graph" in r["cache"]
        if r["graph"] and gbase is not None:
            r["speedup_vs_graphed_static"] = gbase["decode_ms_per_token"] / r["decode_ms_per_token"]
        if r["graph"] and ref is not None:
            r["speedup_vs_bf16_flash_ref"] = ref["decode_ms_per_token"] / r["decode_ms_per_token"]
        vs_g = f"{r['speedup_vs_graphed_static']:.2f}x" if "speedup_vs_graphed_static" in r else "–"
        vs_b = f"{r['speedup_vs_bf16_flash_ref']:.2f}x" if "speedup_vs_bf16_flash_ref" in r else "–"
        r["max_context_tokens"] = int(free // r["bytes_per_token_asymptotic"])
        lines.append(f"| {r['cache']} | {r['decode_ms_per_token']:.3f} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {vs_g} | {vs_b} | "
                     f"{r['cache_bytes'] / 2**20:.1f} MiB | {r['bytes_per_token_asymptotic']} | {r['max_context_tokens']:,} | "
                     + " ".join(f"{x:.2f}" for x in r["runs_ms"]) + " |")
    if host:
        lines += ["", f"Host (CPU) time per decode step, {host['steps']} steps after the prompt, no device sync inside "
                  "a step (wall: the whole step with its end synchronized):", "",
                  "| cache | wall ms/step | model forward (host) | attention modules (host) | cache update (host) | fused attend (host) |",
                  "|---|---|---|---|---|---|"]
        for name, h in host["caches"].items():
            lines.append(f"| {name} | {h['wall']:.2f} | {h['forward']:.2f} | {h['attn']:.2f} | {h['update']:.2f} | "
                         + (f"{h['attend']:.2f}" if h.get("attend") else "–") + " |")
    for name, prof in (host.get("profile") or {}).items():
        lines += ["", f"cProfile of {host['steps']} decode steps with {name} (own time; the profiler inflates "
                  "Python-heavy functions, so compare rows, not totals):", "",
                  "| function | calls/step | own us/step | cumulative us/step |", "|---|---|---|---|"]
        lines += [f"| `{r['function']}` | {r['calls']:.0f} | {r['own_us']:.0f} | {r['cum_us']:.0f} |"
                  for r in prof[:20]]
    env = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
           "transformers": __import__("transformers").__version__, "command": " ".join(sys.argv)}
    out = Path(os.environ.get("OUT", args.out)) if args.out == "$OUT" else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"hf_cuda_decode_b{args.batch}"
    (out / f"{stem}.json").write_text(json.dumps({"environment": env, "rows": rows, "host": host}, indent=1))
    (out / f"{stem}.md").write_text(f"# {stem}\n\n" + "\n".join(f"- {k}: {v}" for k, v in env.items())
                                           + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
