"""The fused CUDA path of :class:`tq.hf.TurboQuantCache`.

On a CUDA device, when the settings fit the fused kernels of :mod:`tq.cuda`
(TurboQuant_mse keys and values at 2-4 bits, hadamard rotation, no sink
tokens, no value centering), a layer of the cache is a ``FusedCudaLayer``:
its history lives in a :class:`tq.cuda.PackedKVLayer` (preallocated packed
storage, a full-precision ring-buffer window), new tokens are compressed by
the fused store kernel, and each decoded token's attention is one
flash-decoding kernel over the packed codes (plus a reduction), never a
dequantized copy.

Prefill attends over the uncompressed prompt with SDPA, then stores it.
Key centering stays exact for free: the same mean is subtracted from every
key, which shifts all scores of a query by q.mean, and softmax ignores that.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from .config import QuantSpec

__all__ = ["FusedCudaLayer", "fused_cuda_reason"]

#: tokens reserved beyond the prompt when no capacity is given
DEFAULT_HEADROOM = 4096


def fused_capacity(capacity: int | None, prompt: int) -> int:
    """Tokens a fused layer preallocates: ``capacity``, or the prompt plus DEFAULT_HEADROOM."""
    return capacity if capacity is not None else prompt + DEFAULT_HEADROOM


def fused_cuda_reason(key_spec: QuantSpec | None, value_spec: QuantSpec | None, sinks: int,
                      device: torch.device) -> str | None:
    """None if a layer with these settings can use the fused CUDA kernels, else why not."""
    if device.type != "cuda":
        return "not a CUDA device"
    if key_spec is None:
        return "unquantized layer"
    for side, s in (("key", key_spec), ("value", value_spec)):
        if s.kind != "mse" or s.rotation != "hadamard" or not 2 <= s.bits <= 4 or not s.norm_correction:
            return f"{side}s must be 2-4 bit TurboQuant_mse with the hadamard rotation and norm correction"
    if value_spec.center:
        return "value centering is not supported by the fused kernels"
    if sinks:
        return "sink tokens are not supported by the fused kernels (use sinks=0)"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed (pip install tq[cuda12] or tq[cuda13])"
    return None


class FusedCudaLayer(DynamicLayer):
    """One cache layer backed by :class:`tq.cuda.PackedKVLayer` (see the module docstring)."""

    is_sliding = False
    is_croppable = False
    #: decode kernel: "auto" (tensor cores, fp16 operands), "mma" or "fma" (float32 throughout)
    impl = "auto"
    #: plan decode launches for this many tokens (fixed grid: tq.hf.graphs.CudaGraphDecoder)
    graph_max_len: int | None = None

    def __init__(self, key_spec: QuantSpec, value_spec: QuantSpec, *, window: int, layer_idx: int,
                 capacity: int | None = None):
        super().__init__()
        self.key_spec, self.value_spec = key_spec, value_spec
        self.quantized = True
        self.window, self.layer_idx, self.capacity = int(window), layer_idx, capacity
        self.fused = None
        self.kmu = None
        self._attn_module = None
        self._ret = None
        self._prefill = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        from ..cuda import PackedKVLayer

        B, H, T, D = key_states.shape
        if value_states.shape[-1] != D:
            raise ValueError("the fused CUDA path needs equal key and value head dims")
        cap = fused_capacity(self.capacity, T)
        if cap < T:
            raise ValueError(f"capacity {cap} is smaller than the prompt ({T} tokens)")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.fused = PackedKVLayer(H, D, self.key_spec.bits, self.value_spec.bits, seed=self.key_spec.seed,
                                   value_seed=self.value_spec.seed, window=self.window, batch=B,
                                   capacity=cap, device=key_states.device, dtype=key_states.dtype)
        if self.key_spec.center:  # frozen at the prompt, like the CPU path
            self.kmu = key_states.float().mean(dim=2, keepdim=True).to(key_states.dtype)
        self.keys = self.values = None
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.fused.max_length
        self._prefill = held == 0
        if held + key_states.shape[-2] > self.fused.capacity:
            raise ValueError(
                f"layer {self.layer_idx}: {held + key_states.shape[-2]} tokens exceed the fused "
                f"cache capacity {self.fused.capacity}; pass a larger `capacity=` to TurboQuantCache")
        if not self._prefill and key_states.shape[-2] != 1:
            raise NotImplementedError(
                "the fused CUDA cache decodes one token per step after the prompt; "
                "use TurboQuantCache(..., fused=False) for chunked prefill or speculative decoding")
        k = key_states - self.kmu if self.kmu is not None else key_states
        self.fused.append(k, value_states)          # casts to the cache dtype if they differ
        self._ret = (key_states, value_states)
        self.keys, self.values = key_states, value_states
        return key_states, value_states

    def attend(self, module, query, key, value, attention_mask, scaling, sdpa, **kwargs):
        """Attention of this step: SDPA over the prompt at prefill, the fused kernel afterwards."""
        if self._prefill:
            self._check_unpadded(attention_mask)
            return sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, **kwargs)
        out = self.fused.decode_attention(query[:, :, 0], scaling, impl=self.impl,
                                          max_len=self.graph_max_len)            # [B, H_q, D]
        return out[:, None], None                                    # [B, 1, H_q, D]

    @staticmethod
    def _check_unpadded(mask) -> None:
        """The kernels hold one length per sequence from its start: no left padding."""
        if mask is None:
            return
        last = mask[:, :, -1, :] if mask.dim() == 4 else mask
        ok = last.all() if last.dtype == torch.bool else bool((last == 0).all())
        if not ok:
            raise NotImplementedError(
                "the fused CUDA cache does not support padded batches yet; "
                "use TurboQuantCache(..., fused=False) for left-padded inputs")

    # ------------------------------------------------------------ protocol
    def get_seq_length(self) -> int:
        return self.fused.max_length if self.fused is not None else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.fused is not None:
            self.fused.reorder(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the fused CUDA cache cannot be cropped (tokens left the window compressed)")

    def reset(self) -> None:
        if self.fused is not None:
            self.fused.reset()

    # ------------------------------------------------------------ bytes
    @property
    def B(self) -> int:
        return self.fused.batch if self.fused is not None else 1

    _pending = False

    def compress_window(self, force: bool = False) -> None:
        """Nothing to do: the store kernel compresses tokens as they leave the window."""

    def shrink_to_fit(self) -> None:
        """Storage is preallocated to ``capacity``; nothing to release."""

    def compressed_token_bytes(self) -> int:
        f = self.fused
        return f.num_kv_heads * (f.ck + f.cv + 4) if f is not None else 0

    def breakdown(self) -> dict:
        f = self.fused
        if f is None:
            return {}
        n = sum(f.seq_lengths)
        nc = sum(max(0, x - f.window) for x in f.seq_lengths)
        win = (n - nc) * f.num_kv_heads * f.head_dim * 2 * f.kwin.element_size()
        mu = self.kmu.numel() * self.kmu.element_size() if self.kmu is not None else 0
        return {"codes": nc * f.num_kv_heads * (f.ck + f.cv), "norms": nc * f.num_kv_heads * 4,
                "window": win, "centering": mu}

    def nbytes(self) -> int:
        """Bytes holding the current tokens (codes, norms, occupied window slots, key mean)."""
        if self.fused is None:
            return 0
        mu = self.kmu.numel() * self.kmu.element_size() if self.kmu is not None else 0
        return self.fused.used_nbytes() + mu

    def allocated_nbytes(self) -> int:
        """Every device byte reserved (the storage is preallocated to ``capacity``)."""
        if self.fused is None:
            return 0
        mu = self.kmu.numel() * self.kmu.element_size() if self.kmu is not None else 0
        return self.fused.nbytes() + mu

    def fp16_nbytes(self) -> int:
        if self.fused is None:
            return 0
        f = self.fused
        return sum(f.seq_lengths) * f.num_kv_heads * f.head_dim * 2 * 2

    def __repr__(self) -> str:
        return f"FusedCudaLayer({self.fused!r})"
