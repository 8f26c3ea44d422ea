"""The ``"torch-triton"`` backend: the torch backend with hand-written Triton kernels on CUDA.

torch tensors in and out, like ``"torch"``.  On CUDA tensors with the ``hadamard``
rotation the encode is one fused Triton kernel (:mod:`tq.backends.triton_kernels`) that
keeps a tile of rows in registers from the load to the packed bytes, where eager torch
makes some 30 passes over a float32 working tensor and ``torch.compile`` still four
(docs/GPU_BACKENDS.md).  Same bytes as the reference: the kernel follows FORMAT.md
section 2 operation by operation.  Everything else (CPU tensors, the dense ``haar``
rotation, padded dims below 16) runs the eager torch code.

Triton ships with CUDA builds of torch; the backend reports itself unavailable without it.
"""
from __future__ import annotations

import os


from ..config import next_pow2
from .base import Parts, register_backend
from .torch_backend import TorchBackend, _empty_parts, _params, torch
from .torch_backend import decode as _torch_decode
from .torch_backend import encode as _torch_encode

try:  # pragma: no cover - exercised by the availability check
    from . import triton_kernels as _tk
except ImportError:  # pragma: no cover
    _tk = None

ROWS_PER_PROGRAM = 32  # R: rows of one program's tile (a power of two, >= 16 for tl.dot)
QJL_COLUMNS = 32       # output columns of S r per tl.dot
MAX_BITS = 4           # the boundary comparisons are unrolled: 2**bits - 1 per coordinate (ptxas
                       # did not finish 8 bits in 2 minutes); wider codes run the eager torch code


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def applies(plan, x) -> bool:
    """Does the Triton encode handle ``plan`` for tensor ``x`` (else the eager torch code runs)?"""
    p = plan.padded_dim
    return (_tk is not None and plan.signs is not None and 16 <= p <= 256 and plan.config.mse_bits <= MAX_BITS
            and (x.is_cuda or _interpreted()))


GLUON_WARPS = 4  # warps of a Gluon program: 128 rows, one per thread


def gluon_applies(plan, x) -> bool:
    """Does the one-row-per-thread Gluon kernel take this encode (CUDA, kind mse, P <= 128, and
    norm correction only without padding)?  Elsewhere the plain Triton kernel runs."""
    cfg = plan.config
    return (_tk is not None and _tk.gluon is not None and x.is_cuda and not _interpreted()
            and cfg.kind == "mse" and 0 < cfg.mse_bits <= MAX_BITS and 16 <= plan.padded_dim <= 128
            and (not cfg.norm_correction or plan.dim == plan.padded_dim))


def _encode_gluon(plan, x, prm, codes, norms):
    n, p = x.shape[0], plan.padded_dim
    grid = (triton.cdiv(n, 32 * GLUON_WARPS),)
    _tk.encode_mse_gluon[grid](
        x, n, x.stride(0), prm["signs"], prm["boundaries"], prm["centroids"], codes, norms,
        DIM=plan.dim, P=p, LOG2P=p.bit_length() - 1, ROUNDS=prm["signs"].shape[0],
        BITS=plan.config.mse_bits, NC=plan.config.norm_correction, NW=GLUON_WARPS,
        num_warps=GLUON_WARPS, **_tk.STRICT)


def _dummy(dev, dtype=None):
    """A one-element placeholder for a pointer argument the kernel's settings never read."""
    return torch.empty(1, dtype=dtype or torch.float32, device=dev)


def encode(plan, x) -> Parts:
    """Hadamard encode of (n, dim) rows through ``triton_kernels.encode_kernel``."""
    cfg = plan.config
    dev = x.device
    prm = _params(plan, dev)
    n, p, b = x.shape[0], plan.padded_dim, cfg.mse_bits
    prod = cfg.kind == "prod"
    codes, norms, qjl, rnorms = _empty_parts(plan, n, dev)
    if n == 0:
        return Parts(codes, norms, qjl, rnorms)
    if x.stride(1) != 1:
        x = x.contiguous()
    if gluon_applies(plan, x):
        _encode_gluon(plan, x, prm, codes, norms)
        return Parts(codes, norms, qjl, rnorms)
    f32 = _dummy(dev)
    grid = (triton.cdiv(n, ROWS_PER_PROGRAM),)
    _tk.encode_kernel[grid](
        x, n, x.stride(0), x.stride(1), prm["signs"],
        prm["boundaries"] if b > 0 else f32, prm["centroids"] if b > 0 else f32,
        prm["qjl_t"] if prod else f32,
        codes if b > 0 else _dummy(dev, torch.uint8), norms if b > 0 else f32,
        qjl if prod else _dummy(dev, torch.uint8), rnorms if prod else f32,
        DIM=plan.dim, P=p, LOG2P=p.bit_length() - 1, ROUNDS=prm["signs"].shape[0],
        BITS=b, BYTES_POW2=next_pow2(max(b, 1)), NC=cfg.norm_correction, PROD=prod,
        QN=min(QJL_COLUMNS, p), R=ROWS_PER_PROGRAM, **_tk.STRICT)
    return Parts(codes, norms, qjl, rnorms)


if _tk is not None:
    import triton


@register_backend
class TorchTritonBackend(TorchBackend):
    """``"torch"`` with the hadamard encode as one fused Triton kernel on CUDA tensors."""

    name = "torch-triton"
    install_hint = ("It needs torch with Triton (CUDA builds of torch ship it): "
                    "`pip install tq[torch] triton`.")

    @classmethod
    def is_available(cls) -> bool:
        return torch is not None and _tk is not None

    def encode(self, plan, x):
        return encode(plan, x) if applies(plan, x) else _torch_encode(plan, x)

    def decode(self, plan, parts):
        return _torch_decode(plan, parts)
