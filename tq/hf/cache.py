"""``TurboQuantCache``: a ``transformers.Cache`` whose history is kept as packed TurboQuant codes.

Per layer the sequence is three segments, in time order::

    [ sinks: first `sinks` tokens, full precision ]
    [ compressed: packed codes + norms (tq format), append-only ]
    [ window: the most recent `window`..`window+block-1` tokens, full precision ]

New tokens enter the window; when it reaches ``window + block`` tokens its
oldest tokens are compressed (``block`` at a time, or the whole excess after a
prompt) and appended to the compressed segment.  Stored codes are never
re-quantized.  Nothing dequantized is kept: with ``tq.hf.enable(model, cache)``
attention is computed from the packed codes (``tq.hf.attention``); without it,
each ``update`` returns a transient dequantized copy so any attention
implementation works (slowly, like transformers' QuantizedCache).
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Iterable

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .codec import make_codec
from .config import PRESETS, QuantSpec, parse_preset, with_overrides
from .storage import PackedStore, TokenBuffer

__all__ = ["TurboQuantCache", "TurboQuantLayer"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class TurboQuantLayer(DynamicLayer):
    """One layer of :class:`TurboQuantCache` (do not set ``_layer_type``: it would hijack DynamicCache)."""

    is_sliding = False
    is_croppable = False  # a rollback cannot un-compress tokens that left the window meanwhile

    def __init__(self, key_spec: QuantSpec | None, value_spec: QuantSpec | None, *, window: int = 128,
                 sinks: int = 4, block: int = 16, layer_idx: int = 0):
        super().__init__()
        self.key_spec, self.value_spec = key_spec, value_spec
        self.quantized = key_spec is not None
        self.window, self.n_sinks, self.block = int(window), int(sinks), int(block)
        self.layer_idx = layer_idx
        self._attn_module = None      # weakref to the attention module (set by tq.hf.enable)
        self._ret = None              # (key, value) objects returned by the last packed-mode update
        self._pending = False         # compression of the window deferred until attention has run
        self.kmu = self.vmu = None    # centering means [B, H, D] float32 (QuantSpec.center)

    # ------------------------------------------------------------ setup
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dtype not in _FLOATS:
            raise TypeError(f"TurboQuantCache needs floating-point keys/values, got {key_states.dtype}")
        B, H, _, Dk = key_states.shape
        Dv = value_states.shape[-1]
        self.dtype, self.device = key_states.dtype, key_states.device
        self.B, self.H, self.Dk, self.Dv = B, H, Dk, Dv
        nsink = self.n_sinks if self.quantized else 0
        self.sink_k = TokenBuffer(B, H, Dk, self.dtype, self.device) if nsink else None
        self.sink_v = TokenBuffer(B, H, Dv, self.dtype, self.device) if nsink else None
        self.win_k = TokenBuffer(B, H, Dk, self.dtype, self.device)
        self.win_v = TokenBuffer(B, H, Dv, self.dtype, self.device)
        if self.quantized:
            self.kcodec = make_codec(self.key_spec, Dk, self.device)
            self.vcodec = make_codec(self.value_spec, Dv, self.device)
            self.kstore = PackedStore(B, H, self.kcodec.widths, self.device)
            self.vstore = PackedStore(B, H, self.vcodec.widths, self.device)
        self.keys = self.values = None
        self.is_initialized = True

    # ------------------------------------------------------------ sizes
    @property
    def n_sink(self) -> int:
        return self.sink_k.n if (self.is_initialized and self.sink_k is not None) else 0

    @property
    def n_comp(self) -> int:
        return self.kstore.n if (self.is_initialized and self.quantized) else 0

    @property
    def n_window(self) -> int:
        return self.win_k.n if self.is_initialized else 0

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.n_sink + self.n_comp + self.n_window

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    # ------------------------------------------------------------ update
    def _check(self, key_states, value_states):
        if key_states.dim() != 4 or value_states.dim() != 4:
            raise ValueError(f"TurboQuantCache expects [batch, kv_heads, seq, head_dim] states, got "
                             f"{tuple(key_states.shape)} / {tuple(value_states.shape)}")
        if key_states.shape[:3] != value_states.shape[:3]:
            raise ValueError(f"key and value states disagree: {tuple(key_states.shape)} vs {tuple(value_states.shape)}")
        B, H, _, Dk = key_states.shape
        if (B, H, Dk, value_states.shape[-1]) != (self.B, self.H, self.Dk, self.Dv):
            raise ValueError(
                f"layer {self.layer_idx}: states of shape {tuple(key_states.shape)} do not match the cache "
                f"(batch {self.B}, kv heads {self.H}, head dims {self.Dk}/{self.Dv}); use a fresh TurboQuantCache "
                "per generation (or reorder_cache / batch_select_indices to change the batch)")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check(key_states, value_states)
        if self._pending:          # attention of the previous step did not run through tq: compress now
            self.compress_window()
        if key_states.dtype != self.dtype:
            key_states, value_states = key_states.to(self.dtype), value_states.to(self.dtype)
        q = key_states.shape[-2]
        take = 0
        if self.sink_k is not None and self.sink_k.n < self.n_sinks:
            take = min(self.n_sinks - self.sink_k.n, q)
            self.sink_k.append(key_states[:, :, :take])
            self.sink_v.append(value_states[:, :, :take])
        if take < q:
            self.win_k.append(key_states[:, :, take:])
            self.win_v.append(value_states[:, :, take:])
        if not self.quantized:
            k, v = self.win_k.view(), self.win_v.view()
            self.keys, self.values = k, v
            return k, v
        if self.packed_mode():
            # tq attention reads every segment itself; the returned objects only identify this call
            k, v = self.win_k.view(), self.win_v.view()
            self._ret = (k, v)
            self._pending = True
            self.keys, self.values = k, v
            return k, v
        # Any other attention implementation: a transient dequantized copy of the whole sequence
        k, v = self.materialize()
        self.compress_window()
        self.keys, self.values = self.win_k.view(), self.win_v.view()
        return k, v

    def packed_mode(self) -> bool:
        mod = self._attn_module() if self._attn_module is not None else None
        if mod is None or getattr(getattr(mod, "config", None), "_attn_implementation", None) != "tq":
            return False
        ref = getattr(mod, "_tq_layer", None)   # the module may since have been bound to another cache
        return ref is not None and ref() is self

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole sequence dequantized, [B, H, T, D] in the model dtype (transient, not stored)."""
        ks, vs = [], []
        if self.n_sink:
            ks.append(self.sink_k.view())
            vs.append(self.sink_v.view())
        if self.n_comp:
            kd, vd = self.kcodec.decode(self.kstore.view()), self.vcodec.decode(self.vstore.view())
            if self.kmu is not None:
                kd = kd + self.kmu[:, :, None]
            if self.vmu is not None:
                vd = vd + self.vmu[:, :, None]
            ks.append(kd.to(self.dtype))
            vs.append(vd.to(self.dtype))
        ks.append(self.win_k.view())
        vs.append(self.win_v.view())
        return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)

    def compress_window(self, force: bool = False) -> None:
        """Compress the window's oldest tokens down to ``window`` once it holds ``window + block``."""
        self._pending = False
        self._ret = None
        if not self.quantized:
            return
        w = self.win_k.n
        if w < self.window + (1 if force else self.block):
            return
        n = w - self.window
        self._append_compressed(self.win_k.buf[:, :, :n], self.win_v.buf[:, :, :n])
        self.win_k.drop_oldest(n)
        self.win_v.drop_oldest(n)

    def _append_compressed(self, k: torch.Tensor, v: torch.Tensor) -> None:
        B, H, n, _ = k.shape
        if self.key_spec.center and self.kmu is None:
            self.kmu = k.float().mean(dim=2)
        if self.value_spec.center and self.vmu is None:
            self.vmu = v.float().mean(dim=2)
        if self.kmu is not None:
            k = k.float() - self.kmu[:, :, None]
        if self.vmu is not None:
            v = v.float() - self.vmu[:, :, None]
        for codec, store, x in ((self.kcodec, self.kstore, k), (self.vcodec, self.vstore, v)):
            f = codec.encode(x.reshape(B * H * n, x.shape[-1]))
            store.append({name: t.reshape(B, H, n, t.shape[-1]) for name, t in f.items()}, n)

    # ------------------------------------------------------------ bytes
    def nbytes(self) -> int:
        """Every byte this layer keeps: sinks, packed codes/norms/scales, window."""
        if not self.is_initialized:
            return 0
        total = self.win_k.nbytes() + self.win_v.nbytes()
        if self.sink_k is not None:
            total += self.sink_k.nbytes() + self.sink_v.nbytes()
        if self.quantized:
            total += self.kstore.nbytes() + self.vstore.nbytes() + self._mean_nbytes()
        return total

    def _mean_nbytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in (self.kmu, self.vmu) if m is not None)

    def allocated_nbytes(self) -> int:
        """Bytes of the buffers as allocated (used bytes plus growth slack)."""
        if not self.is_initialized:
            return 0
        bufs = [self.win_k, self.win_v] + ([self.sink_k, self.sink_v] if self.sink_k is not None else [])
        total = sum(b.allocated_nbytes() for b in bufs)
        if self.quantized:
            total += self.kstore.allocated_nbytes() + self.vstore.allocated_nbytes() + self._mean_nbytes()
        return total

    def breakdown(self) -> dict:
        if not self.is_initialized:
            return {}
        out = {"window": self.win_k.nbytes() + self.win_v.nbytes(),
               "sinks": (self.sink_k.nbytes() + self.sink_v.nbytes()) if self.sink_k is not None else 0}
        if self.quantized:
            for name, st in (("keys", self.kstore), ("values", self.vstore)):
                per = st.B * st.H * st.n
                out[f"{name}_codes"] = per * (st.widths["codes"] + st.widths["qjl"])
                out[f"{name}_norms_scales"] = per * 2 * (st.widths["n1"] + st.widths["n2"])
            out["means"] = self._mean_nbytes()
        else:
            out = {"unquantized": out["window"]}
        return out

    def fp16_nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.B * self.H * self.get_seq_length() * (self.Dk + self.Dv) * 2

    # ------------------------------------------------------------ cache surgery
    def _buffers(self):
        out = [self.win_k, self.win_v]
        if self.sink_k is not None:
            out += [self.sink_k, self.sink_v]
        if self.quantized:
            out += [self.kstore, self.vstore]
        return out

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"Calling `crop` with a positive value ({tokens_to_remove}) is not supported; "
                             "pass a negative number of tokens to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self._pending, self._ret = False, None
        n = -tokens_to_remove
        t = min(n, self.win_k.n)
        self.win_k.truncate(self.win_k.n - t)
        self.win_v.truncate(self.win_v.n - t)
        n -= t
        if n and self.quantized:
            t = min(n, self.kstore.n)
            self.kstore.truncate(self.kstore.n - t)
            self.vstore.truncate(self.vstore.n - t)
            n -= t
        if n and self.sink_k is not None:
            t = min(n, self.sink_k.n)
            self.sink_k.truncate(self.sink_k.n - t)
            self.sink_v.truncate(self.sink_v.n - t)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.is_initialized:
            return
        for b in self._buffers():
            b.index_batch(beam_idx)
        self.B = self.win_k.B
        if self.kmu is not None:
            self.kmu = self.kmu.index_select(0, beam_idx.to(self.kmu.device))
        if self.vmu is not None:
            self.vmu = self.vmu.index_select(0, beam_idx.to(self.vmu.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        if not isinstance(indices, torch.Tensor):
            indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        self.reorder_cache(indices.long())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.is_initialized:
            return
        for b in self._buffers():
            b.repeat_batch(repeats)
        self.B = self.win_k.B
        if self.kmu is not None:
            self.kmu = self.kmu.repeat_interleave(repeats, dim=0)
        if self.vmu is not None:
            self.vmu = self.vmu.repeat_interleave(repeats, dim=0)

    def reset(self) -> None:
        self.is_initialized = False
        self.kmu = self.vmu = None
        self.keys = self.values = None
        self._pending, self._ret = False, None

    def offload(self):
        if self.is_initialized:
            for b in self._buffers():
                b.to("cpu")
            self.kmu = self.kmu.to("cpu") if self.kmu is not None else None
            self.vmu = self.vmu.to("cpu") if self.vmu is not None else None

    def prefetch(self):
        if self.is_initialized and self.win_k.device != self.device:
            for b in self._buffers():
                b.to(self.device)
            self.kmu = self.kmu.to(self.device) if self.kmu is not None else None
            self.vmu = self.vmu.to(self.device) if self.vmu is not None else None

    def shrink_to_fit(self) -> None:
        if self.is_initialized:
            for b in self._buffers():
                b.shrink_to_fit()

    def __repr__(self):
        if not self.quantized:
            return f"TurboQuantLayer({self.layer_idx}, unquantized)"
        return (f"TurboQuantLayer({self.layer_idx}, K{self.key_spec.label()}V{self.value_spec.label()}, "
                f"sinks={self.n_sink}, compressed={self.n_comp}, window={self.n_window})")


class TurboQuantCache(Cache):
    """A KV cache for transformers >= 5.17 that keeps history as TurboQuant codes.

    >>> cache = TurboQuantCache(model.config, "K4V4")            # doctest: +SKIP
    >>> tq.hf.enable(model, cache)                                # attention from packed codes
    >>> out = model.generate(**inputs, past_key_values=cache)     # doctest: +SKIP

    Arguments: ``config`` (the model config: checks the layer types and sizes the
    cache; optional), ``preset`` (see :data:`tq.hf.PRESETS`), per-side overrides
    ``key_bits``/``key_kind`` (mse|prod)/``key_rotation`` and ``value_bits``/
    ``value_kind`` (mse|prod|group)/``value_group_size``, ``window`` (recent
    tokens kept in full precision, default 128), ``sinks`` (first tokens kept in
    full precision, default 4), ``block`` (compress the window in blocks of this
    many tokens), ``skip_layers`` (layer indices kept unquantized; negative
    indices count from the end and need ``config``), ``seed``,
    ``norm_correction`` (default True) and ``center_keys`` / ``center_values``
    (subtract a per-head mean frozen at the first compression; keys default on).
    """

    def __init__(self, config=None, preset: str = "K4V4", *, key_bits: int | None = None,
                 key_kind: str | None = None, key_rotation: str | None = None, value_bits: int | None = None,
                 value_kind: str | None = None, value_group_size: int | None = None,
                 value_rotation: str | None = None, window: int = 128, sinks: int = 4, block: int = 16,
                 skip_layers: Iterable[int] = (), seed: int = 0, norm_correction: bool = True,
                 center_keys: bool = True, center_values: bool = False, num_layers: int | None = None,
                 fused: bool | str = "auto", capacity: int | None = None):
        if isinstance(config, str) and preset == "K4V4":
            config, preset = None, config  # TurboQuantCache("K3V2")
        kspec, vspec = parse_preset(preset)
        if key_kind == "group":
            raise ValueError("key_kind='group' is not supported: keys use TurboQuant (mse or prod)")
        kspec = with_overrides(kspec, bits=key_bits, kind=key_kind, rotation=key_rotation, seed=seed,
                               norm_correction=norm_correction, center=bool(center_keys))
        vspec = with_overrides(vspec, bits=value_bits, kind=value_kind, rotation=value_rotation,
                               group_size=value_group_size, seed=seed + 1, norm_correction=norm_correction,
                               center=bool(center_values))
        for name, val, lo in (("window", window, 0), ("sinks", sinks, 0), ("block", block, 1)):
            if isinstance(val, bool) or not isinstance(val, int) or val < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {val!r}")
        if fused not in ("auto", True, False):
            raise ValueError(f"fused must be 'auto', True or False, got {fused!r}")
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        self.fused, self.capacity = fused, capacity
        self.key_spec, self.value_spec = kspec, vspec
        self.preset = f"K{kspec.label()}V{vspec.label()}"
        self.window, self.sinks, self.block = window, sinks, block
        if config is not None:
            num_layers = _check_config(config, num_layers)
        skip = set()
        for i in skip_layers:
            if isinstance(i, bool) or not isinstance(i, int):
                raise ValueError(f"skip_layers must hold integers, got {i!r}")
            if i < 0:
                if num_layers is None:
                    raise ValueError("negative skip_layers need the model config (or num_layers)")
                i += num_layers
            if i < 0 or (num_layers is not None and i >= num_layers):
                raise ValueError(f"skip_layers index {i} is out of range for {num_layers} layers")
            skip.add(i)
        self.skip_layers = tuple(sorted(skip))
        self.num_layers = num_layers
        layers = [self._make_layer(i) for i in range(num_layers)] if num_layers is not None else []
        super().__init__(layers=layers)

    def _make_layer(self, i: int) -> TurboQuantLayer:
        q = i not in self.skip_layers
        return TurboQuantLayer(self.key_spec if q else None, self.value_spec if q else None,
                               window=self.window, sinks=self.sinks, block=self.block, layer_idx=i)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.num_layers is not None and layer_idx >= self.num_layers:
            raise ValueError(f"layer index {layer_idx} is beyond the {self.num_layers} layers of this cache")
        while len(self.layers) <= layer_idx:
            self.layers.append(self._make_layer(len(self.layers)))
        if not self.layers[layer_idx].is_initialized and self.fused is not False:
            self._maybe_fuse(layer_idx, key_states.device)
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def _maybe_fuse(self, i: int, device: torch.device) -> None:
        """On CUDA, swap layer i for the fused-kernel layer when its settings allow (tq.hf.cuda_layer)."""
        from .cuda_layer import FusedCudaLayer, fused_cuda_reason

        old = self.layers[i]
        reason = fused_cuda_reason(old.key_spec, old.value_spec, self.sinks, device)
        if reason is None and not old.packed_mode():
            reason = "attention from packed codes is not enabled (call tq.hf.enable(model, cache))"
        if reason is not None:
            if self.fused is True and old.quantized:
                raise ValueError(f"fused=True but layer {i} cannot use the fused CUDA kernels: {reason}")
            if device.type == "cuda" and old.quantized and not getattr(self, "_warned_unfused", False):
                # fused="auto" on a GPU: say once why the (much faster) fused kernels are not used
                self._warned_unfused = True
                warnings.warn(f"TurboQuantCache: layer {i} on {device} decodes through the torch path, not the "
                              f"fused CUDA kernels: {reason}. Pass fused=False to keep the torch path silently.",
                              stacklevel=3)
            return
        new = FusedCudaLayer(old.key_spec, old.value_spec, window=self.window, layer_idx=i, capacity=self.capacity)
        mod = old._attn_module() if old._attn_module is not None else None
        new._attn_module = old._attn_module
        if mod is not None:
            mod._tq_layer = weakref.ref(new)
        self.layers[i] = new

    # ------------------------------------------------------------ byte accounting
    def nbytes(self) -> int:
        """Every byte the cache keeps: packed codes, norms, group scales/zeros, sinks, windows, unquantized layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def allocated_nbytes(self) -> int:
        return sum(layer.allocated_nbytes() for layer in self.layers)

    def fp16_nbytes(self) -> int:
        """Size of the same keys and values in an uncompressed float16 cache."""
        return sum(layer.fp16_nbytes() for layer in self.layers)

    def bytes_per_token(self) -> float:
        """nbytes() per cached token (all layers, heads, keys and values; per sequence of the batch)."""
        n = self.get_seq_length()
        b = next((layer.B for layer in self.layers if layer.is_initialized), 1)
        return self.nbytes() / (n * b) if n else 0.0

    def compression_ratio(self) -> float:
        nb = self.nbytes()
        return self.fp16_nbytes() / nb if nb else float("inf")

    def breakdown(self) -> dict:
        out: dict = {}
        for layer in self.layers:
            for k, v in layer.breakdown().items():
                out[k] = out.get(k, 0) + v
        return out

    def compressed_bytes_per_token(self) -> float:
        """Bytes one more compressed token costs (all layers, K+V): the long-context asymptote."""
        total = 0
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            if hasattr(layer, "compressed_token_bytes"):
                total += layer.compressed_token_bytes()
            elif layer.quantized:
                total += layer.H * (layer.kstore.row_bytes() + layer.vstore.row_bytes())
            else:
                total += layer.H * (layer.Dk + layer.Dv) * torch.empty((), dtype=layer.dtype).element_size()
        return float(total)

    def shrink_to_fit(self) -> None:
        for layer in self.layers:
            layer.shrink_to_fit()

    def compress_pending(self) -> None:
        for layer in self.layers:
            if layer.is_initialized and layer._pending:
                layer.compress_window()

    def __repr__(self):
        return (f"TurboQuantCache(preset={self.preset!r}, window={self.window}, sinks={self.sinks}, "
                f"block={self.block}, skip_layers={self.skip_layers}, layers={len(self.layers)}, "
                f"seq={self.get_seq_length()})")


def _check_config(config, num_layers):
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("TurboQuantCache supports decoder-only models; encoder-decoder / cross-attention "
                         "caches are not supported")
    dec = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
        types, _ = get_layer_types_and_kwargs(dec)
    except Exception:  # pragma: no cover - very old/new transformers
        types = getattr(dec, "layer_types", None) or ["full_attention"] * dec.num_hidden_layers
    bad = sorted(set(types) - {"full_attention"})
    if bad:
        raise ValueError(f"TurboQuantCache supports only full-attention layers; this model has {bad} layers "
                         "(sliding-window, chunked, linear or shared-KV layers are not supported)")
    n = len(types)
    if num_layers is not None and num_layers != n:
        raise ValueError(f"num_layers={num_layers} disagrees with the config's {n} layers")
    return n
