"""PyTorch backend: pure torch ops on CPU or CUDA tensors.

Inputs and outputs stay torch tensors on the input's device.  The encoding
follows docs/FORMAT.md section 2 operation by operation, so with the
``hadamard`` rotation the bytes are identical to the NumPy reference:

* prescale by an exact power of two built from the exponent bits (frexp);
* FWHT stages h = 1, 2, 4, ... written as elementwise adds/subtracts;
* sum of squares by the halving tree; sqrt computed in float64 and rounded
  (torch's vectorized float32 CPU sqrt is not correctly rounded); true
  division (tensor by tensor, so no reciprocal shortcut); strict boundary count via
  ``torch.searchsorted(side="left")``;
* norms rounded to float16 by ``Tensor.to`` (round to nearest even).

No operation that could fuse a multiply into an add (addcmul, baddbmm, ...)
is used on that path.  Dense products (the ``haar`` rotation and the QJL
projection ``S r``) use matmul in full float32 precision (TF32 switched off
around the call); there FORMAT.md section 5's tolerance applies.

torch is imported when this module is imported, which the registry only does
when backend "torch" is requested; without torch the backend reports itself
unavailable.
"""
from __future__ import annotations

import contextlib

import numpy as np

from ..config import next_pow2
from ..packing import row_bytes
from .base import Backend, Parts, register_backend

try:  # pragma: no cover - exercised by the availability check
    import torch
except ImportError:  # pragma: no cover
    torch = None

_CHUNK_ELEMS = 1 << 25  # elements of one (rows, P) float32 work tensor per chunk
_SCORE_CHUNK_ELEMS = 1 << 24


# ----------------------------------------------------------------- helpers
def _params(plan, device):
    """The plan's arrays as torch tensors on ``device`` (cached per plan and device)."""
    key = ("torch", str(device))

    def make():
        def t(a):
            return None if a is None else torch.tensor(np.asarray(a), device=device)

        return {
            "signs": t(plan.signs),
            "matrix": t(plan.matrix),
            "matrix_t": None if plan.matrix is None else t(np.ascontiguousarray(plan.matrix.T)),
            "centroids": t(plan.centroids),
            "boundaries": t(plan.boundaries),
            "qjl": t(plan.qjl_matrix),
            "qjl_t": None if plan.qjl_matrix is None else t(np.ascontiguousarray(plan.qjl_matrix.T)),
            "shifts8": torch.arange(8, device=device, dtype=torch.int64),
        }

    return plan.cached(key, make)


@contextlib.contextmanager
def _full_precision():
    """Switch TF32 off for float32 matmuls inside the block (restored afterwards)."""
    prev = torch.get_float32_matmul_precision()
    if prev == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def _mm(a, b):
    with _full_precision():
        return torch.matmul(a, b)


def _pow2(e):
    """2**e as float32 for int32 e in [-126, 127], built from the exponent bits (exact)."""
    return torch.bitwise_left_shift(e.to(torch.int32) + 127, 23).view(torch.float32)


def prescale(x):
    """Rows scaled by 2**-e so max|x| lies in [0.5, 1); returns (scaled, e)."""
    m = x.abs().amax(dim=1)
    _, e = torch.frexp(m)
    e = e.to(torch.int32).clamp_(-126, 126)
    return x * _pow2(-e)[:, None], e


def fwht(v):
    """Unnormalized FWHT along dim 1 (power-of-two length), stages h = 1, 2, 4, ..."""
    n, p = v.shape
    if p == 1:
        return v
    bufs = (torch.empty_like(v), torch.empty_like(v))  # never writes into the caller's tensor
    h, k = 1, 0
    while h < p:
        out = bufs[k]
        src = v.view(n, p // (2 * h), 2, h)
        dst = out.view(n, p // (2 * h), 2, h)
        a, b = src[:, :, 0, :], src[:, :, 1, :]
        torch.add(a, b, out=dst[:, :, 0, :])
        torch.sub(a, b, out=dst[:, :, 1, :])
        v, k = out, 1 - k
        h *= 2
    return v


def sqrt_rn(s):
    """Correctly rounded float32 sqrt.

    torch's vectorized CPU sqrt is not correctly rounded (an AVX-512 build
    differs from IEEE in ~15% of float32 lanes and ~1% of float64 lanes).  The
    square root of a float32 lies at least 2**-49 (relative) away from any
    float32 rounding midpoint, so a float64 square root that is within one
    float64 ulp (2**-52) rounds to the correctly rounded float32 result.
    Checked exhaustively on four binades (tests/test_torch_backend.py)."""
    return torch.sqrt(s.to(torch.float64)).to(torch.float32)


def tree_sum_squares(y):
    """Squares rounded first, then the halving tree over the row zero-padded to a power of two."""
    s = y * y
    width = next_pow2(s.shape[1])
    if width != s.shape[1]:
        s = torch.nn.functional.pad(s, (0, width - s.shape[1]))
    while width > 1:
        width //= 2
        s = s[:, :width] + s[:, width : 2 * width]
    return s[:, 0]


def rotate(plan, prm, v):
    """Forward rotation of float32 rows (n, dim) -> (n, P)."""
    if plan.signs is None:
        return _mm(v, prm["matrix_t"])
    p = plan.padded_dim
    if v.shape[1] < p:
        v = torch.nn.functional.pad(v, (0, p - v.shape[1]))
    for r in range(prm["signs"].shape[0]):
        v = fwht(v * prm["signs"][r])
    return v * np.float32(1.0 / p)


def unrotate(plan, prm, y):
    if plan.signs is None:
        return _mm(y, prm["matrix"])
    v = y
    for r in range(prm["signs"].shape[0] - 1, -1, -1):
        v = fwht(v) * prm["signs"][r]
    return (v * np.float32(1.0 / plan.padded_dim))[:, : plan.dim]


def decoded_direction(plan, prm, c):
    """What decoding keeps of a rotated centroid vector (FORMAT.md step 6): c itself,
    or with Hadamard zero-padding (dim < P) its inverse rotation truncated to dim."""
    if plan.signs is None or plan.padded_dim == plan.dim:
        return c
    return unrotate(plan, prm, c)


def pack_bits(codes, count, bits, shifts8):
    """(n, count) integer codes < 2**bits -> (n, row_bytes) uint8, LSB-first bit stream."""
    n = codes.shape[0]
    g = (count + 7) // 8
    wide = 8 if bits > 3 else 4    # bytes of a word of 8 codes: int32 while 8 * bits < 32 (no sign-bit overflow)
    c = codes.to(torch.int64 if wide == 8 else torch.int32)
    if g * 8 != count:
        c = torch.nn.functional.pad(c, (0, g * 8 - count))
    if wide == 4:
        shifts8 = shifts8.to(torch.int32)
    words = torch.bitwise_left_shift(c.view(n, g, 8), shifts8 * bits).sum(dim=2, dtype=c.dtype)  # disjoint bits: sum == or
    out = words.view(torch.uint8).view(n, g, wide)[:, :, :bits].reshape(n, g * bits)
    return out[:, : row_bytes(count, bits)].contiguous()


def unpack_bits(packed, count, bits, shifts8):
    """Inverse of pack_bits: (n, row_bytes) uint8 -> (n, count) int64 codes."""
    n = packed.shape[0]
    g = (count + 7) // 8
    buf = torch.zeros((n, g, 8), dtype=torch.uint8, device=packed.device)
    flat = packed
    if flat.shape[1] != g * bits:
        flat = torch.nn.functional.pad(flat, (0, g * bits - flat.shape[1]))
    buf[:, :, :bits] = flat.view(n, g, bits)
    words = buf.view(torch.int64)  # (n, g, 1), little-endian
    codes = torch.bitwise_right_shift(words, shifts8 * bits) & ((1 << bits) - 1)
    return codes.view(n, g * 8)[:, :count]


def _to_norm(plan, v):
    return v.to(torch.float16 if plan.config.norm_dtype == "float16" else torch.float32)


def _chunks(n, width, elems):
    step = max(1, elems // max(1, width))
    for lo in range(0, n, step):
        yield lo, min(n, lo + step)


def _empty_parts(plan, n, dev):
    """Uninitialized output tensors (codes, norms, qjl, rnorms) for n encoded rows."""
    cfg = plan.config
    ndt = torch.float16 if cfg.norm_dtype == "float16" else torch.float32
    return (torch.empty((n, plan.code_bytes), dtype=torch.uint8, device=dev),
            torch.empty((n if cfg.mse_bits > 0 else 0,), dtype=ndt, device=dev),
            torch.empty((n, plan.qjl_bytes), dtype=torch.uint8, device=dev),
            torch.empty((n if cfg.kind == "prod" else 0,), dtype=ndt, device=dev))


# ----------------------------------------------------------------- kernels
def encode(plan, x):
    cfg = plan.config
    dev = x.device
    prm = _params(plan, dev)
    n, p, b = x.shape[0], plan.padded_dim, cfg.mse_bits
    codes, norms, qjl, rnorms = _empty_parts(plan, n, dev)
    for lo, hi in _chunks(n, p, _CHUNK_ELEMS):
        _encode_chunk(plan, prm, x[lo:hi], b, codes[lo:hi], norms[lo:hi] if b > 0 else None,
                      qjl[lo:hi], rnorms[lo:hi] if cfg.kind == "prod" else None)
    return Parts(codes, norms, qjl, rnorms)


def _encode_chunk(plan, prm, x, b, codes, norms, qjl, rnorms):
    cfg = plan.config
    x = x.to(torch.float32)
    xs, e = prescale(x)
    y = rotate(plan, prm, xs)
    norm = sqrt_rn(tree_sum_squares(y))
    # norm == 0 only for an all-zero row (prescaling puts its largest entry in [0.5, 1)), whose
    # y is +-0: dividing it by 1 gives the reference's zero direction up to the sign of zero,
    # which no comparison below sees.
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    u = y / safe[:, None]
    pow2e = _pow2(e)
    if b > 0:
        idx = torch.searchsorted(prm["boundaries"], u, right=False, out_int32=True)
        c = prm["centroids"][idx.long()]
        if cfg.norm_correction:
            cn = sqrt_rn(tree_sum_squares(decoded_direction(plan, prm, c)))
            stored = (norm / cn) * pow2e
            if cfg.kind == "prod":                 # the residual needs the normalized centroids
                c = c / cn[:, None]
        else:
            stored = norm * pow2e
        codes.copy_(pack_bits(idx, plan.padded_dim, b, prm["shifts8"]))
        norms.copy_(_to_norm(plan, stored))
    else:
        c = None
    if cfg.kind == "prod":
        r = u - c if c is not None else u
        rnorm = (sqrt_rn(tree_sum_squares(r)) * norm) * pow2e
        proj = _mm(r, prm["qjl_t"])
        qjl.copy_(pack_bits((proj >= 0).to(torch.uint8), plan.padded_dim, 1, prm["shifts8"]))
        rnorms.copy_(_to_norm(plan, rnorm))


# ----------------------------------------------------------------- fused (torch.compile) encode and decode
# The same operations as _encode_chunk and decode, written without out= views or data-dependent
# branches so that TorchInductor can fuse them into a few kernels.  Compiled with
# strict numerics: no multiply-add contraction, IEEE division, no flush-to-zero
# (docs/FORMAT.md fixes every rounding), so the bytes stay the reference's; the GPU
# tests check that.  Hadamard rotation only (the dense products stay on matmul).
_STRICT_INDUCTOR = {"emulate_precision_casts": True, "eager_numerics.division_rounding": True,
                    "eager_numerics.disable_ftz": True,
                    # not numerics: lets a stack of 2**4 butterfly outputs stay one pointwise kernel
                    "max_pointwise_cat_inputs": 16}


def _exponent(m):
    """frexp(m)[1] clamped to [-126, 126], from the float32 bits (m >= 0, finite)."""
    biased = torch.bitwise_right_shift(m.view(torch.int32), 23) & 255
    return torch.where(m == 0, torch.zeros_like(biased), (biased - 126).clamp(-126, 126))


FWHT_GROUP = 2  # butterfly stages per stacked kernel: the fastest measured (torch_fused_encode_h100.md)


def _fwht_stacked(v, group=None):
    """fwht() as stacked adds and subtracts (same values, no out= views).

    ``group`` stages at a time (default FWHT_GROUP) are written as one stack of
    2**group expressions, each the butterfly's own adds in the butterfly's order,
    so that the compiler emits one kernel per group instead of one per stage."""
    group = group or FWHT_GROUP
    n, p = v.shape
    h = 1
    while h < p:
        k = 1
        while k < group and h * 2 ** (k + 1) <= p:
            k += 1
        m = 1 << k
        s = v.view(n, p // (h * m), m, h)
        a = [s[:, :, j, :] for j in range(m)]
        for t in range(k):
            w = 1 << t
            for j in range(m):
                if not j & w:
                    a[j], a[j + w] = a[j] + a[j + w], a[j] - a[j + w]
        v = torch.stack(a, dim=2).reshape(n, p)
        h *= m
    return v


def _unrotate_stacked(y, signs, *, dim, p, group):
    """unrotate() for the hadamard rotation with the stacked FWHT (compile-friendly)."""
    for r in range(signs.shape[0] - 1, -1, -1):
        y = _fwht_stacked(y, group) * signs[r]
    return (y * np.float32(1.0 / p))[:, :dim]


def _encode_core(x, signs, boundaries, centroids, shifts8, *, dim, p, bits, prod, nc, f16, group):
    """(codes, norms, residual, residual norm) of float rows x, hadamard rotation; the last two None
    for kind mse, the first two None for 0 MSE bits.  The QJL product of the residual stays outside."""
    x = x.to(torch.float32)
    e = _exponent(x.abs().amax(dim=1))
    v = x * _pow2(-e)[:, None]
    if dim < p:
        v = torch.nn.functional.pad(v, (0, p - dim))
    for r in range(signs.shape[0]):
        v = _fwht_stacked(v * signs[r], group)
    y = v * np.float32(1.0 / p)
    norm = sqrt_rn(tree_sum_squares(y))
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    u = y / safe[:, None]
    pow2e = _pow2(e)
    ndt = torch.float16 if f16 else torch.float32
    codes = norms = c = None
    if bits > 0:
        # searchsorted(right=False) as a count of boundaries below u (same integers, fusable)
        idx = (u[:, :, None] > boundaries).sum(dim=2, dtype=torch.int32)
        c = centroids[idx.long()]
        if nc:
            # decoded direction: with zero-padding, the inverse rotation of c truncated to dim
            cd = _unrotate_stacked(c, signs, dim=dim, p=p, group=group) if dim < p else c
            cn = sqrt_rn(tree_sum_squares(cd))
            stored = (norm / cn) * pow2e
            if prod:
                c = c / cn[:, None]
        else:
            stored = norm * pow2e
        codes = pack_bits(idx, p, bits, shifts8)
        norms = stored.to(ndt)
    if not prod:
        return codes, norms, None, None
    res = u - c if c is not None else u
    rnorm = ((sqrt_rn(tree_sum_squares(res)) * norm) * pow2e).to(ndt)
    return codes, norms, res, rnorm


_COMPILED: dict = {}
_MIN_ROWS = 1024  # smallest compiled chunk: shorter inputs are zero-padded to a power of four


def _compile_setting(core, settings):
    """torch.compile of ``core`` with the keyword-only ``settings`` fixed (cached per setting).

    Each setting gets its own copy of the code object as a plain function with its settings as
    keyword defaults, so that torch.compile's per-function recompile limit counts shapes of one
    setting, not settings (a functools.partial would be wrapped in one shared helper).  Every
    setting is an argument, not a global: dynamo guards on globals and silently recompiles
    when they change."""
    key = (core.__name__,) + tuple(settings.items())
    if key not in _COMPILED:
        import types

        name = f"{core.__name__}_{'_'.join(str(int(v)) for v in settings.values())}"
        code = core.__code__.replace(co_name=name)
        fn = types.FunctionType(code, core.__globals__, name)
        fn.__kwdefaults__ = dict(settings)
        _COMPILED[key] = torch.compile(fn, dynamic=False, fullgraph=True, options=dict(_STRICT_INDUCTOR))
    return _COMPILED[key]


def _compilable(plan):
    return plan.signs is not None and torch is not None and hasattr(torch, "compile")


def fused_encode_fn(plan, group=None):
    """The compiled encode core for ``plan``'s static settings and the FWHT ``group`` (default
    FWHT_GROUP), cached; None where it does not apply (the dense haar rotation)."""
    if not _compilable(plan):
        return None
    cfg = plan.config
    return _compile_setting(_encode_core, dict(
        dim=plan.dim, p=plan.padded_dim, bits=cfg.mse_bits, prod=cfg.kind == "prod",
        nc=cfg.norm_correction, f16=cfg.norm_dtype == "float16", group=group or FWHT_GROUP))


def fused_decode_fn(plan, group=None):
    """The compiled decode core for ``plan`` (hadamard only; None otherwise), cached."""
    if not _compilable(plan):
        return None
    return _compile_setting(_decode_core, dict(
        dim=plan.dim, p=plan.padded_dim, bits=plan.config.mse_bits,
        prod=plan.config.kind == "prod", group=group or FWHT_GROUP))


def _chunk_rows(n, step):
    """Rows of each compiled call: ``step`` for long inputs, else a power of four >= n, so that one
    setting compiles at most a handful of shapes (torch.compile's recompile limit is 8)."""
    if n >= step:
        return step
    rows = _MIN_ROWS
    while rows < n:
        rows *= 4
    return min(rows, step)


def _padded_chunks(n, width, elems):
    """(lo, hi, rows) of each compiled call: rows >= hi - lo is one of a few static shapes."""
    rows = _chunk_rows(n, max(1, elems // width))
    for lo in range(0, n, rows):
        yield lo, min(n, lo + rows), rows


def _pad_rows(t, rows):
    """t with zero rows appended up to ``rows`` (zero rows are valid input everywhere)."""
    if t.shape[0] == rows:
        return t
    return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, rows - t.shape[0]))


def encode_fused(plan, x, fn=None):
    """encode() through the compiled core (chunked like encode); same Parts, same bytes."""
    cfg = plan.config
    dev = x.device
    prm = _params(plan, dev)
    fn = fn or fused_encode_fn(plan)
    n, p, b = x.shape[0], plan.padded_dim, cfg.mse_bits
    codes, norms, qjl, rnorms = _empty_parts(plan, n, dev)
    for lo, hi, rows in _padded_chunks(n, p, _CHUNK_ELEMS):
        cb, nb, res, rn = fn(_pad_rows(x[lo:hi], rows), prm["signs"], prm["boundaries"], prm["centroids"],
                             prm["shifts8"])
        k = hi - lo
        if b > 0:
            codes[lo:hi] = cb[:k]
            norms[lo:hi] = nb[:k]
        if cfg.kind == "prod":
            proj = _mm(res[:k], prm["qjl_t"])
            qjl[lo:hi] = pack_bits((proj >= 0).to(torch.uint8), p, 1, prm["shifts8"])
            rnorms[lo:hi] = rn[:k]
    return Parts(codes, norms, qjl, rnorms)


def _unpack_codes(packed, *, p, bits, shifts8):
    """unpack_bits() without out= views: each group of 8 codes as one int64 word."""
    n, g = packed.shape[0], (p + 7) // 8
    if packed.shape[1] != g * bits:
        packed = torch.nn.functional.pad(packed, (0, g * bits - packed.shape[1]))
    b = packed.view(n, g, bits).to(torch.int64)
    words = b[:, :, 0]
    for k in range(1, bits):
        words = words | torch.bitwise_left_shift(b[:, :, k], 8 * k)
    codes = torch.bitwise_right_shift(words[:, :, None], shifts8 * bits) & ((1 << bits) - 1)
    return codes.view(n, g * 8)[:, :p]


def _decode_core(codes, norms, qjl_term, signs, centroids, shifts8, *, dim, p, bits, prod, group):
    """decode() of one chunk with the hadamard rotation: centroids times norms, plus the QJL
    term (computed outside: a matmul) for kind prod, rotated back and truncated to dim."""
    y = qjl_term if prod else None
    if bits > 0:
        m = centroids[_unpack_codes(codes, p=p, bits=bits, shifts8=shifts8)] * norms.to(torch.float32)[:, None]
        y = m if y is None else m + y
    if y is None:
        y = torch.zeros((codes.shape[0], p), dtype=torch.float32, device=codes.device)
    return _unrotate_stacked(y, signs, dim=dim, p=p, group=group)


def decode_fused(plan, parts, fn=None):
    """decode() through the compiled core (hadamard only): the eager path's values."""
    cfg = plan.config
    dev = parts.codes.device
    prm = _params(plan, dev)
    fn = fn or fused_decode_fn(plan)
    n, p = parts.codes.shape[0], plan.padded_dim
    out = torch.empty((n, plan.dim), dtype=torch.float32, device=dev)
    for lo, hi, rows in _padded_chunks(n, p, _CHUNK_ELEMS // 4):
        z = _pad_rows(_qjl_term(plan, prm, parts, lo, hi), rows) if cfg.kind == "prod" else None
        norms = _pad_rows(parts.norms[lo:hi], rows) if cfg.mse_bits > 0 else parts.norms  # (0,): unused
        y = fn(_pad_rows(parts.codes[lo:hi], rows), norms, z, prm["signs"], prm["centroids"], prm["shifts8"])
        out[lo:hi] = y[: hi - lo]
    return out


def _qjl_term(plan, prm, parts, lo, hi):
    """The QJL part of the rotated estimate of rows lo:hi (kind prod): gamma * S^T signs."""
    signs = unpack_bits(parts.qjl[lo:hi], plan.padded_dim, 1, prm["shifts8"]).to(torch.float32) * 2 - 1
    gamma = parts.rnorms[lo:hi].to(torch.float32) * np.float32(plan.qjl_scale)
    return _mm(signs, prm["qjl"]) * gamma[:, None]


def _rotated_estimate(plan, prm, parts, lo, hi):
    cfg = plan.config
    p = plan.padded_dim
    dev = parts.codes.device
    y = None
    if cfg.mse_bits > 0:
        idx = unpack_bits(parts.codes[lo:hi], p, cfg.mse_bits, prm["shifts8"])
        y = prm["centroids"][idx] * parts.norms[lo:hi].to(torch.float32)[:, None]
    if cfg.kind == "prod":
        z = _qjl_term(plan, prm, parts, lo, hi)
        y = z if y is None else y + z
    if y is None:
        y = torch.zeros((hi - lo, p), dtype=torch.float32, device=dev)
    return y


def decode(plan, parts):
    dev = parts.codes.device
    prm = _params(plan, dev)
    n = parts.codes.shape[0]
    out = torch.empty((n, plan.dim), dtype=torch.float32, device=dev)
    for lo, hi in _chunks(n, plan.padded_dim, _CHUNK_ELEMS // 4):
        out[lo:hi] = unrotate(plan, prm, _rotated_estimate(plan, prm, parts, lo, hi))
    return out


def scores(plan, q, parts):
    cfg = plan.config
    dev = parts.codes.device
    prm = _params(plan, dev)
    q = q.to(device=dev, dtype=torch.float32)
    qr = rotate(plan, prm, q)
    n, p = parts.codes.shape[0], plan.padded_dim
    out = torch.zeros((q.shape[0], n), dtype=torch.float32, device=dev)
    sq = _mm(qr, prm["qjl_t"]) if cfg.kind == "prod" else None
    for lo, hi in _chunks(n, p, _SCORE_CHUNK_ELEMS):
        if cfg.mse_bits > 0:
            c = prm["centroids"][unpack_bits(parts.codes[lo:hi], p, cfg.mse_bits, prm["shifts8"])]
            out[:, lo:hi] = _mm(qr, c.T) * parts.norms[lo:hi].to(torch.float32)
        if cfg.kind == "prod":
            signs = unpack_bits(parts.qjl[lo:hi], p, 1, prm["shifts8"]).to(torch.float32) * 2 - 1
            gamma = parts.rnorms[lo:hi].to(torch.float32) * np.float32(plan.qjl_scale)
            out[:, lo:hi] += _mm(sq, signs.T) * gamma
    return out


# ----------------------------------------------------------------- backend
_NP_TO_TORCH = {}


@register_backend
class TorchBackend(Backend):
    """Pure-torch implementation (CPU and CUDA tensors)."""

    name = "torch"
    install_hint = "Install it with `pip install tq[torch]` (or `pip install torch`)."

    @classmethod
    def is_available(cls) -> bool:
        return torch is not None

    def owns(self, x) -> bool:
        return isinstance(x, torch.Tensor)

    def asarray(self, x):
        if isinstance(x, torch.Tensor):
            return x
        if type(x).__module__.startswith("cupy") or hasattr(x, "__cuda_array_interface__"):
            # a zero-copy view of a GPU array, on its device
            return torch.from_dlpack(x)
        a = np.asarray(x)
        if not a.flags.writeable or not a.flags.c_contiguous:
            a = np.array(a, copy=True)
        return torch.from_numpy(a)

    def shape_dtype(self, x):
        return tuple(x.shape), str(x.dtype).replace("torch.", "")

    def all_finite(self, x) -> bool:
        if x.numel() == 0:
            return True
        return bool(torch.isfinite(x).all())

    def to_numpy(self, a):
        a = a.detach().cpu()
        if a.dtype == torch.bfloat16:
            a = a.to(torch.float32)
        return a.numpy()

    def from_numpy(self, a, device=None):
        return torch.tensor(np.asarray(a), device=device if device is not None else "cpu")

    def encode(self, plan, x):
        return encode(plan, x)

    def decode(self, plan, parts):
        return decode(plan, parts)

    def scores(self, plan, q, parts):
        return scores(plan, q, parts)


@register_backend
class TorchCompiledBackend(TorchBackend):
    """The torch backend with its hadamard encode and decode compiled by torch.compile
    (encode_fused, decode_fused).

    Same bytes as ``"torch"`` (strict numerics; tests/test_gpu_backends.py checks it on CUDA).
    The first call of each setting compiles it (seconds); worth it on CUDA for large inputs,
    not on CPU (docs/GPU_BACKENDS.md has the measurements).  The dense haar rotation and
    scores run the eager torch code."""

    name = "torch-compiled"

    def encode(self, plan, x):
        fn = fused_encode_fn(plan)
        return encode(plan, x) if fn is None else encode_fused(plan, x, fn)

    def decode(self, plan, parts):
        fn = fused_decode_fn(plan)
        return decode(plan, parts) if fn is None else decode_fused(plan, parts, fn)
