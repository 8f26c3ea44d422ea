"""The ``"torch-triton"`` backend: the torch backend with hand-written Triton kernels on CUDA.

torch tensors in and out, like ``"torch"``.  On CUDA tensors with the ``hadamard`` rotation
(:mod:`tq.backends.triton_kernels`):

* encode is one fused kernel that keeps the rows in registers from the load to the packed
  bytes (Gluon, one row per thread, for P <= 128; plain Triton for P = 256 and padded norm
  correction), where eager torch makes some 30 passes over a float32 working tensor and
  ``torch.compile`` still four.  Same bytes as the reference: FORMAT.md section 2 operation
  by operation (QJL signs within section 5's bound).
* decode and inner products (P <= 128) read the packed sections once and compute on TF32
  tensor cores with split operands (float32 accuracy, FORMAT.md section 3).

Everything else (CPU tensors, the dense ``haar`` rotation, P < 16, more than 4 bits for the
encode, P = 256 for decode and scores) runs the eager torch code.  Triton ships with CUDA
builds of torch; the backend reports itself unavailable without it.
"""
from __future__ import annotations

import os

import numpy as np

from ..config import next_pow2
from . import numpy_backend as _ref
from .base import Parts, register_backend
from .torch_backend import TorchBackend, _empty_parts, _mm, _params, torch
from .torch_backend import decode as _torch_decode
from .torch_backend import encode as _torch_encode
from .torch_backend import rotate as _rotate
from .torch_backend import scores as _torch_scores

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
    """Does the one-row-per-thread Gluon kernel take this encode (P <= 128, norm correction only
    without padding)?  Elsewhere the plain Triton kernel runs."""
    cfg = plan.config
    return (_tk is not None and _tk.gluon is not None and (x.is_cuda or _interpreted())
            and cfg.mse_bits <= MAX_BITS and 16 <= plan.padded_dim <= 128
            and (not cfg.norm_correction or plan.dim == plan.padded_dim))


def _encode_gluon(plan, x, prm, parts: Parts):
    n, p, b = x.shape[0], plan.padded_dim, plan.config.mse_bits
    prod, dev = plan.config.kind == "prod", x.device
    f32, u8 = _dummy(dev), _dummy(dev, torch.uint8)
    grid = (triton.cdiv(n, 32 * GLUON_WARPS),)
    _tk.encode_gluon[grid](
        x, n, x.stride(0), prm["signs"], prm["boundaries"] if b > 0 else f32,
        prm["centroids"] if b > 0 else f32, prm["qjl"] if prod else f32,
        parts.codes if b > 0 else u8, parts.norms if b > 0 else f32,
        parts.qjl if prod else u8, parts.rnorms if prod else f32,
        DIM=plan.dim, P=p, LOG2P=p.bit_length() - 1, ROUNDS=prm["signs"].shape[0],
        BITS=b, NC=plan.config.norm_correction, PROD=prod, NW=GLUON_WARPS,
        num_warps=GLUON_WARPS, **_tk.STRICT)


def _dummy(dev, dtype=None):
    """A one-element placeholder for a pointer argument the kernel's settings never read."""
    return torch.empty(1, dtype=dtype or torch.float32, device=dev)


def encode(plan, x, gluon: bool | None = None) -> Parts:
    """Hadamard encode of (n, dim) rows through ``triton_kernels.encode_gluon`` where
    :func:`gluon_applies` (unless ``gluon=False``), else ``triton_kernels.encode_kernel``."""
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
    if gluon is not False and gluon_applies(plan, x):
        parts = Parts(codes, norms, qjl, rnorms)
        _encode_gluon(plan, x, prm, parts)
        return parts
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


# ----------------------------------------------------------------- decode and inner products
DECODE_ROWS = 64       # rows of a decode program (one wgmma M tile)
DECODE_COLUMNS = 64    # output columns per product: one (P, 64) slice of M in shared memory
DECODE_WARPS = 8       # offline ptxas, P = 128: no spills at 8 warps (4 warps spilled)
SCORE_ROWS = 128       # packed rows of a scores program
SCORE_QUERIES = 16     # queries of a scores program (more queries: a second grid axis)
SCORE_WARPS = 8        # offline ptxas, P = 128: no spills at 8 warps (4 warps spilled)
MAX_DECODE_P = 128     # at P = 256 the tiles overflow shared memory or spill (offline ptxas): eager torch
SINGLE_STAGE = {"num_stages": 1}  # no software pipelining: the slices of M would not fit shared memory


def decode_applies(plan, parts) -> bool:
    """Do the Triton decode and scores kernels take this plan (hadamard, 16 <= P <= 128, CUDA)?"""
    p = plan.padded_dim
    return (_tk is not None and plan.signs is not None and 16 <= p <= MAX_DECODE_P
            and (parts.codes.is_cuda or _interpreted()))


def tf32_halves(t):
    """(2, ...) float32 tensor: t = hi + lo exactly, hi = t truncated to TF32's 10 mantissa bits
    and lo the remainder (itself truncated by a TF32 product: 2^-20 relative of t)."""
    t = t.contiguous()
    hi = (t.view(torch.int32) & -8192).view(torch.float32)
    return torch.stack([hi, t - hi]).contiguous()


def inverse_rotation_matrices(plan):
    """(M, S M) as float32 numpy arrays: x = y M undoes the hadamard rotation (FORMAT.md section 3),
    M = H D1 H D0 / P.  Entries of M are k / P with |k| <= P, exact in float32 and in TF32."""
    def make():
        p = plan.padded_dim
        v = np.eye(p)  # the rows of M: the reference's inverse rotation of each basis vector, untruncated
        for signs in plan.signs[::-1]:
            v = _ref.fwht(v) * signs
        m = v / p
        sm = None if plan.qjl_matrix is None else np.asarray(plan.qjl_matrix, np.float64) @ m
        return m.astype(np.float32), None if sm is None else sm.astype(np.float32)

    return plan.cached(("triton-inverse-rotation",), make)


def _device_arrays(plan, dev):
    """M, the TF32 halves of S M and of the centroids, on ``dev`` (cached per plan and device)."""
    def make():
        m, sm = (None if a is None else torch.from_numpy(a).to(dev) for a in inverse_rotation_matrices(plan))
        return {"m": m, "sm": None if sm is None else tf32_halves(sm),
                "cents": tf32_halves(_params(plan, dev)["centroids"]) if plan.config.mse_bits > 0 else _dummy(dev)}

    return plan.cached(("triton-arrays", str(dev)), make)


def _section_args(plan, parts, dev):
    """The four sections (placeholders for absent ones) as kernel arguments."""
    b, prod = plan.config.mse_bits, plan.config.kind == "prod"
    u8, f32 = _dummy(dev, torch.uint8), _dummy(dev)
    return (parts.codes if b > 0 else u8, parts.norms if b > 0 else f32,
            parts.qjl if prod else u8, parts.rnorms if prod else f32)


def gluon_decode_applies(plan, parts) -> bool:
    """Does the one-row-per-thread Gluon decode take this plan (kind mse, P <= 128)?  It does the
    reference's operations in its order (register butterflies); prod needs S, which runs on the
    tensor cores of ``decode_kernel``."""
    return (_tk is not None and _tk.gluon is not None and plan.config.kind == "mse"
            and plan.config.mse_bits > 0 and 16 <= plan.padded_dim <= 128)


def decode(plan, parts, gluon: bool | None = None):
    """(n, dim) float32 from the packed sections through ``triton_kernels.decode_gluon`` where
    :func:`gluon_decode_applies` (unless ``gluon=False``), else ``triton_kernels.decode_kernel``."""
    dev = parts.codes.device
    n, p, b = parts.codes.shape[0], plan.padded_dim, plan.config.mse_bits
    out = torch.empty((n, plan.dim), dtype=torch.float32, device=dev)
    if n == 0:
        return out
    if gluon is not False and gluon_decode_applies(plan, parts):
        prm = _params(plan, dev)
        _tk.decode_gluon[(triton.cdiv(n, 32 * GLUON_WARPS),)](
            parts.codes, parts.norms, prm["signs"], prm["centroids"], out, n, out.stride(0),
            DIM=plan.dim, P=p, LOG2P=p.bit_length() - 1, ROUNDS=prm["signs"].shape[0], BITS=b,
            NW=GLUON_WARPS, num_warps=GLUON_WARPS, **_tk.STRICT)
        return out
    arr, prod = _device_arrays(plan, dev), plan.config.kind == "prod"
    sm = arr["sm"] if prod else _dummy(dev).expand(2, 1)
    grid = (triton.cdiv(n, DECODE_ROWS),)
    _tk.decode_kernel[grid](
        *_section_args(plan, parts, dev), _params(plan, dev)["centroids"], arr["m"], sm[0], sm[1], out,
        n, out.stride(0), float(plan.qjl_scale),
        DIM=plan.dim, P=p, BITS=b, CODE_BYTES=plan.code_bytes, PROD=prod,
        R=DECODE_ROWS, NB=min(DECODE_COLUMNS, p), num_warps=DECODE_WARPS, **SINGLE_STAGE)
    return out


def gluon_scores_applies(plan, parts) -> bool:
    """Does the one-row-per-thread Gluon scores kernel take this plan (P <= 128)?"""
    return _tk is not None and _tk.gluon is not None and 16 <= plan.padded_dim <= 128


def scores(plan, q, parts, gluon: bool | None = None):
    """(m, n) float32 estimates of <q_i, x_j>: the queries are rotated once (eager torch), then
    ``triton_kernels.scores_gluon`` reads each packed row once for all queries where
    :func:`gluon_scores_applies` (unless ``gluon=False``), else ``triton_kernels.scores_kernel``
    once per 16 queries."""
    dev = parts.codes.device
    prm = _params(plan, dev)
    qr = _rotate(plan, prm, q.to(device=dev, dtype=torch.float32))
    m, n, p = q.shape[0], parts.codes.shape[0], plan.padded_dim
    prod = plan.config.kind == "prod"
    out = torch.empty((m, n), dtype=torch.float32, device=dev)
    if m == 0 or n == 0:
        return out
    sq = _mm(qr, prm["qjl_t"]).contiguous() if prod else None
    if gluon is not False and gluon_scores_applies(plan, parts):
        b = plan.config.mse_bits
        _tk.scores_gluon[(triton.cdiv(n, 32 * GLUON_WARPS),)](
            qr.contiguous(), sq if prod else _dummy(dev), *_section_args(plan, parts, dev),
            prm["centroids"] if b > 0 else _dummy(dev), out, m, n, out.stride(0), float(plan.qjl_scale),
            P=p, BITS=b, PROD=prod, NW=GLUON_WARPS, num_warps=GLUON_WARPS)
        return out
    grid = (triton.cdiv(n, SCORE_ROWS), triton.cdiv(m, SCORE_QUERIES))
    _tk.scores_kernel[grid](
        tf32_halves(qr), tf32_halves(sq) if prod else _dummy(dev), *_section_args(plan, parts, dev),
        _device_arrays(plan, dev)["cents"], out, m, n, out.stride(0),
        float(plan.qjl_scale), P=p, NCENT=1 << plan.config.mse_bits, BITS=plan.config.mse_bits,
        CODE_BYTES=plan.code_bytes, PROD=prod, BM=SCORE_QUERIES, BN=SCORE_ROWS, num_warps=SCORE_WARPS,
        **SINGLE_STAGE)
    return out


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
        return decode(plan, parts) if decode_applies(plan, parts) else _torch_decode(plan, parts)

    def scores(self, plan, q, parts):
        return scores(plan, q, parts) if decode_applies(plan, parts) else _torch_scores(plan, q, parts)
