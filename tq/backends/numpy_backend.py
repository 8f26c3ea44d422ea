"""NumPy reference backend: the readable specification of the encoding.

Every step below is spelled out in docs/FORMAT.md ("Encoding, step by step").
All arithmetic is float32 with one rounding per operation, in the order
written here; other backends must reproduce it bit for bit (hadamard rotation)
or within the documented tolerance (dense matrix products).
"""
from __future__ import annotations

import numpy as np

from ..config import next_pow2
from ..packing import pack_bits, unpack_bits
from .base import Backend, Parts, register_backend

F32 = np.float32
_SCORE_CHUNK = 4096  # vectors gathered at a time in `scores`


# ----------------------------------------------------------------- the spec
def prescale(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale each row by an exact power of two so max|x| lies in [0.5, 1).

    Returns the scaled rows and the exponents e (x = scaled * 2**e).  Keeps
    squares and butterflies far from float32 overflow for huge inputs and away
    from subnormals for tiny ones.  e is clamped to [-126, 126] so 2**-e is a
    normal float32; zero rows get e = 0.
    """
    _, e = np.frexp(np.max(np.abs(x), axis=1))
    e = np.clip(e, -126, 126).astype(np.int32)
    return x * np.ldexp(F32(1), -e)[:, None], e


def fwht(v: np.ndarray) -> np.ndarray:
    """Unnormalized fast Walsh-Hadamard transform along axis 1 (length a power of two).

    Stages h = 1, 2, 4, ...: each pair (i, i + h) with bit h of i clear becomes
    (v_i + v_{i+h}, v_i - v_{i+h}).
    """
    n, p = v.shape
    h = 1
    while h < p:
        blocks = v.reshape(n, p // (2 * h), 2, h)
        a, b = blocks[:, :, 0, :], blocks[:, :, 1, :]
        v = np.stack([a + b, a - b], axis=2).reshape(n, p)
        h *= 2
    return v


def dense_matvec(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Rows of v times m^T, accumulated over j = 0, 1, ... in float32 (no FMA)."""
    acc = np.zeros((v.shape[0], m.shape[0]), dtype=F32)
    for j in range(m.shape[1]):
        acc = acc + v[:, j : j + 1] * m[:, j]
    return acc


def tree_sum_squares(y: np.ndarray) -> np.ndarray:
    """Sum of squares per row: squares rounded first, then a halving tree
    s[i] += s[i + half] over the row zero-padded to a power of two."""
    s = y * y
    width = next_pow2(s.shape[1])
    if width != s.shape[1]:
        s = np.concatenate([s, np.zeros((s.shape[0], width - s.shape[1]), F32)], axis=1)
    while width > 1:
        width //= 2
        s = s[:, :width] + s[:, width : 2 * width]
    return s[:, 0]


def rotate(plan, v: np.ndarray) -> np.ndarray:
    """Forward rotation of rows v (n, dim) float32 -> (n, padded_dim)."""
    if plan.signs is None:
        return dense_matvec(plan.matrix, v)
    p = plan.padded_dim
    if v.shape[1] < p:
        v = np.concatenate([v, np.zeros((v.shape[0], p - v.shape[1]), F32)], axis=1)
    for signs in plan.signs:
        v = fwht(v * signs)
    return v * F32(1.0 / p)  # two unnormalized rounds scale by p: exact power of two


def unrotate(plan, y: np.ndarray) -> np.ndarray:
    """Inverse rotation (n, padded_dim) -> (n, dim)."""
    if plan.signs is None:
        return y @ plan.matrix
    v = y
    for signs in plan.signs[::-1]:
        v = fwht(v) * signs
    return (v * F32(1.0 / plan.padded_dim))[:, : plan.dim]


def decoded_direction(plan, c: np.ndarray) -> np.ndarray:
    """The part of a rotated centroid vector that decoding keeps.

    Without padding that is c itself (the rotation preserves norms).  With
    Hadamard zero-padding (dim < P) decoding truncates the unrotated vector to
    dim entries, so norm correction must use the norm of that truncation.
    """
    if plan.signs is None or plan.padded_dim == plan.dim:
        return c
    return unrotate(plan, c)


def quantize(plan, u: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid = number of boundaries strictly below u."""
    return np.searchsorted(plan.boundaries, u, side="left").astype(np.uint8)


def unit_rows(plan, x: np.ndarray):
    """Steps 1-4: (prescaled rows xs, exponents e, norm of the rotated rows, unit rows u)."""
    xs, e = prescale(x.astype(F32, copy=False))
    y = rotate(plan, xs)
    norm = np.sqrt(tree_sum_squares(y))
    safe = np.where(norm > 0, norm, F32(1))
    u = np.where(norm[:, None] > 0, y / safe[:, None], F32(0))
    return xs, e, norm, u


def quantized_direction(plan, u: np.ndarray):
    """(codes, the unit vector they stand for, its norm-correction divisor or None):
    the centroids of the codes, divided by the norm of what decoding outputs when
    norm correction is on."""
    idx = quantize(plan, u)
    c = plan.centroids[idx]
    if not plan.config.norm_correction:
        return idx, c, None
    cn = np.sqrt(tree_sum_squares(decoded_direction(plan, c)))
    return idx, c / cn[:, None], cn


def encode(plan, x: np.ndarray) -> Parts:
    cfg = plan.config
    _, e, norm, u = unit_rows(plan, x)
    pow2e = np.ldexp(F32(1), e)
    n = x.shape[0]
    if cfg.mse_bits > 0:
        idx, c, cn = quantized_direction(plan, u)
        stored = norm * pow2e if cn is None else (norm / cn) * pow2e
        codes = pack_bits(idx, cfg.mse_bits)
        norms = _to_norm_dtype(plan, stored)
    else:
        c = np.zeros_like(u)
        codes = np.zeros((n, 0), np.uint8)
        norms = np.zeros(0, plan.norm_dtype)
    if cfg.kind == "prod":
        r = u - c
        rnorm = (np.sqrt(tree_sum_squares(r)) * norm) * pow2e
        proj = dense_matvec(plan.qjl_matrix, r)
        qjl = pack_bits((proj >= 0).astype(np.uint8), 1)
        rnorms = _to_norm_dtype(plan, rnorm)
    else:
        qjl = np.zeros((n, 0), np.uint8)
        rnorms = np.zeros(0, plan.norm_dtype)
    return Parts(codes, norms, qjl, rnorms)


# ----------------------------------------------------------------- agreement (FORMAT.md section 5)
def dense_tolerance(p: int) -> float:
    """g = max(2^-16, 2^-23 P): the relative rounding distance allowed where a backend
    computes a P-term dense product in another order (two float32 sums of P terms)."""
    return max(2.0**-16, 2.0**-23 * p)


def qjl_sign_margin(plan, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(p, g sum_j |S_ij r_j|) in float64 for the reference's QJL residual r of rows x:
    a backend's sign bit i may differ from the reference's only where |p_i| <= the bound."""
    u = unit_rows(plan, x)[3]
    c = quantized_direction(plan, u)[1] if plan.config.mse_bits > 0 else np.zeros_like(u)
    r = (u - c).astype(np.float64)
    s = plan.qjl_matrix.astype(np.float64)
    return r @ s.T, dense_tolerance(plan.padded_dim) * (np.abs(r) @ np.abs(s).T)


def _to_norm_dtype(plan, v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return v.astype(plan.norm_dtype)  # round to nearest even; overflow -> inf (core reports it)


def rotated_estimate(plan, parts: Parts, lo: int, hi: int) -> np.ndarray:
    """Reconstruction of vectors lo..hi in the rotated space (n, padded_dim)."""
    cfg = plan.config
    p = plan.padded_dim
    y = np.zeros((hi - lo, p), F32)
    if cfg.mse_bits > 0:
        idx = unpack_bits(parts.codes[lo:hi], p, cfg.mse_bits)
        y = plan.centroids[idx] * parts.norms[lo:hi].astype(F32)[:, None]
    if cfg.kind == "prod":
        signs = unpack_bits(parts.qjl[lo:hi], p, 1).astype(F32) * 2 - 1
        gamma = parts.rnorms[lo:hi].astype(F32) * F32(plan.qjl_scale)
        y = y + (signs @ plan.qjl_matrix) * gamma[:, None]
    return y


def decode(plan, parts: Parts) -> np.ndarray:
    n = parts.codes.shape[0]
    return unrotate(plan, rotated_estimate(plan, parts, 0, n)).astype(F32, copy=False)


def scores(plan, q: np.ndarray, parts: Parts) -> np.ndarray:
    """<q_i, x_j> estimated from packed codes: rotate q once, gather centroids."""
    cfg = plan.config
    qr = rotate(plan, q.astype(F32, copy=False))
    n, p = parts.codes.shape[0], plan.padded_dim
    out = np.zeros((q.shape[0], n), F32)
    sq = qr @ plan.qjl_matrix.T if cfg.kind == "prod" else None
    for lo in range(0, n, _SCORE_CHUNK):
        hi = min(n, lo + _SCORE_CHUNK)
        if cfg.mse_bits > 0:
            c = plan.centroids[unpack_bits(parts.codes[lo:hi], p, cfg.mse_bits)]
            out[:, lo:hi] = (qr @ c.T) * parts.norms[lo:hi].astype(F32)
        if cfg.kind == "prod":
            signs = unpack_bits(parts.qjl[lo:hi], p, 1).astype(F32) * 2 - 1
            gamma = parts.rnorms[lo:hi].astype(F32) * F32(plan.qjl_scale)
            out[:, lo:hi] += (sq @ signs.T) * gamma
    return out


# ----------------------------------------------------------------- backend
class NumpyArrays(Backend):
    """Array plumbing shared by the backends that work on NumPy arrays (numpy, numba)."""

    def owns(self, x) -> bool:
        return isinstance(x, np.ndarray)

    def asarray(self, x):
        if hasattr(x, "__cuda_array_interface__") or type(x).__module__.startswith(("torch", "cupy")):
            raise TypeError(
                f"backend {self.name!r} got a {type(x).__module__}.{type(x).__name__}; "
                "pass a NumPy array or choose the backend that owns this array type"
            )
        return np.asarray(x)

    def shape_dtype(self, x):
        return tuple(x.shape), x.dtype.name

    def all_finite(self, x) -> bool:
        return bool(np.isfinite(x).all())

    def to_numpy(self, a):
        return np.asarray(a)

    def from_numpy(self, a, device=None):
        return np.asarray(a)


@register_backend
class NumpyBackend(NumpyArrays):
    """The reference implementation (readable, exact, not fast)."""

    name = "numpy"

    def encode(self, plan, x):
        return encode(plan, x)

    def decode(self, plan, parts):
        return decode(plan, parts)

    def scores(self, plan, q, parts):
        return scores(plan, q, parts)
