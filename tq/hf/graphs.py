"""Greedy decoding with each decode step replayed from one CUDA graph.

Eager decoding of a small-batch model is bound by the host: every step issues a few
hundred kernels from Python (transformers' modules, the cache, the attention), and the
GPU waits for them (docs/DECODE_KERNEL.md, "End to end").  A CUDA graph records one step's
kernels once and replays them with one call, the same technique behind transformers'
static cache + ``torch.compile(mode="reduce-overhead")`` and vLLM's decode graphs.

>>> dec = CudaGraphDecoder(model, cache, max_length=prompt_len + 128)   # doctest: +SKIP
>>> tokens = dec.generate(input_ids, max_new_tokens=128)                # doctest: +SKIP

Works with caches whose decode step has fixed shapes and keeps its position on the device:

* :class:`tq.hf.TurboQuantCache` on its fused CUDA path: the store kernel reads the
  lengths from the device, and ``decode_attention`` is planned for ``max_length`` (its
  grid and chunk stay fixed while the kernels read the current lengths);
* transformers' ``StaticCache`` (the bf16 baseline).

The host's mirror of the fused layers' lengths is put back after the capture (the capture
ran the Python once without running the kernels) and advanced after every replay.
Greedy only; the graph holds the decode step of one batch shape.
"""
from __future__ import annotations

import torch

from .cuda_layer import DEFAULT_HEADROOM, FusedCudaLayer, fused_capacity, fused_cuda_reason

__all__ = ["CudaGraphDecoder"]


def _check_cache(cache, max_length: int) -> None:
    """Refuse, before any work, a cache whose decode step a graph cannot replay or that cannot
    hold ``max_length`` tokens (a StaticCache written past its end is a device-side assert)."""
    from transformers.cache_utils import StaticCache, StaticLayer

    from .cache import TurboQuantCache

    if isinstance(cache, TurboQuantCache):
        if cache.fused is False:
            raise TypeError("TurboQuantCache(fused=False) decodes through the torch path, whose shapes grow: "
                            "CUDA graphs need the fused CUDA path (fused=True or 'auto', sinks=0)")
        if cache.skip_layers:
            raise TypeError(f"TurboQuantCache layers {list(cache.skip_layers)} are unquantized (skip_layers) and "
                            "decode through the torch path, which a CUDA graph cannot replay")
        if cache.capacity is not None and cache.capacity < max_length:
            raise ValueError(f"the cache's capacity {cache.capacity} is below max_length {max_length}")
        reason = fused_cuda_reason(cache.key_spec, cache.value_spec, cache.sinks, torch.device("cuda"))
        if reason is not None:
            raise TypeError(f"this TurboQuantCache cannot use the fused CUDA kernels ({reason}), "
                            "which CUDA graphs need")
    elif isinstance(cache, StaticCache):
        for i, layer in enumerate(cache.layers):
            if not isinstance(layer, StaticLayer) or getattr(layer, "is_sliding", False):
                raise TypeError(f"layer {i} is a {type(layer).__name__}: only full-attention static layers "
                                "replay from a CUDA graph")
            if layer.max_cache_len < max_length:
                raise ValueError(f"layer {i}: max_cache_len {layer.max_cache_len} is below max_length {max_length}")
    else:
        raise TypeError(f"a {type(cache).__name__} cannot be replayed from a CUDA graph (its shapes grow): "
                        "use TurboQuantCache on its fused CUDA path (tq.hf.enable(model, cache), sinks=0) "
                        "or a StaticCache")


def _graph_layers(cache, max_length: int):
    """The cache's fused layers; a clear error for any layer a graph cannot replay."""
    from transformers.cache_utils import StaticLayer

    fused = []
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, FusedCudaLayer):
            if layer.fused is not None and layer.fused.capacity < max_length:
                raise ValueError(f"layer {i}: capacity {layer.fused.capacity} is below max_length {max_length}")
            fused.append(layer)
        elif not isinstance(layer, StaticLayer):
            raise TypeError(
                f"layer {i} is a {type(layer).__name__}: CUDA graphs need fixed-shape decode steps, i.e. "
                "TurboQuantCache on its fused CUDA path (tq.hf.enable(model, cache), sinks=0) or a StaticCache")
    return fused


class CudaGraphDecoder:
    """Greedy generation for ``model`` with ``cache``, decode steps replayed from a CUDA graph.

    Args:
        model: a transformers causal LM on a CUDA device (decoder-only).
        cache: a ``TurboQuantCache`` (fused path: ``tq.hf.enable(model, cache)`` first) or a
            ``StaticCache``; fresh (nothing stored) before ``generate``.
        max_length: most tokens a sequence reaches (prompt + new tokens); the fused kernels
            are planned for it and ``generate`` refuses to go beyond.
        warmup: eager decode steps before the capture (kernel compilation, workspaces).
    """

    def __init__(self, model, cache, *, max_length: int, warmup: int = 2):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an integer >= 1, got {warmup!r}")
        _check_cache(cache, max_length)
        from .cache import TurboQuantCache
        #: the fused layers will size themselves from the prompt (checked against max_length in generate)
        self._default_capacity = isinstance(cache, TurboQuantCache) and cache.capacity is None
        self.model, self.cache = model, cache
        self.max_length, self.warmup = max_length, warmup
        self.replays = 0

    def _forward(self, ids, pos):
        out = self.model(input_ids=ids, position_ids=pos, past_key_values=self.cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor, max_new_tokens: int) -> torch.LongTensor:
        """Greedy continuation: [batch, prompt] -> [batch, prompt + max_new_tokens] token ids.

        The prompt runs eagerly (prefill), then ``warmup`` eager decode steps, then the
        capture of one step and its replays."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, prompt], got {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if self._default_capacity and fused_capacity(None, t) < self.max_length:
            raise ValueError(f"the cache's default capacity (prompt {t} + {DEFAULT_HEADROOM}) is below max_length "
                             f"{self.max_length}; pass capacity=max_length to TurboQuantCache")
        if input_ids.device.type != "cuda":
            raise ValueError(f"input_ids must be on a CUDA device, got {input_ids.device}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < self.warmup + 2:
            raise ValueError(f"max_new_tokens must be an integer >= warmup + 2 = {self.warmup + 2}, "
                             f"got {max_new_tokens!r}")
        if t + max_new_tokens > self.max_length:
            raise ValueError(f"prompt {t} + {max_new_tokens} new tokens exceed max_length {self.max_length}")
        if self.cache.get_seq_length() != 0:
            raise ValueError("the cache must be empty before generate (one cache per generation)")
        pos = torch.arange(t, device=input_ids.device).expand(b, t)
        tok = self._forward(input_ids, pos)                      # prefill: sizes the fused layers
        fused = _graph_layers(self.cache, self.max_length)
        for layer in fused:
            layer.graph_max_len = self.max_length
        out = [input_ids, tok]
        ids = tok.clone()
        p = torch.full((b, 1), t, dtype=torch.long, device=input_ids.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                             # warm-up off the capture's stream
            for _ in range(self.warmup):
                ids.copy_(self._forward(ids, p))
                p.add_(1)
                out.append(ids.clone())
        torch.cuda.current_stream().wait_stream(side)
        saved = [layer.fused.host_state() for layer in fused]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            nxt = self._forward(ids, p)
            ids.copy_(nxt)
            p.add_(1)
        for layer, state in zip(fused, saved):                   # the capture ran no kernel
            layer.fused.set_host_state(state)
        for _ in range(max_new_tokens - 1 - self.warmup):
            graph.replay()
            self.replays += 1
            for layer in fused:
                layer.fused.advance_host(1)
            out.append(ids.clone())
        return torch.cat(out, dim=1)
