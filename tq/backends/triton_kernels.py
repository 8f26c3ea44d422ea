"""Triton kernels of the torch-triton backend: the hadamard encode as one fused kernel, decode
and inner products straight from the packed rows.

``encode_kernel`` (plain Triton) owns R rows of a (P, R) float32 tile and executes
docs/FORMAT.md section 2 on it, one rounding per operation in the specification's order, so
the bytes equal the NumPy reference's:

* an FWHT stage gathers every coordinate's partner i ^ h along the row (``tl.gather``)
  and keeps v_i + v_{i+h} or v_i - v_{i+h} (the butterfly's own adds);
* the sum of squares is the halving tree, as the same partner exchange (``tl.sum`` would
  not fix the order); the square root and the division are the correctly rounded ``sqrt_rn`` and
  ``div_rn``;
* launched with ``enable_fp_fusion=False`` (no multiply-add contraction) and
  ``enable_reflect_ftz=False`` (libdevice keeps subnormals);
* codes are the count of boundaries strictly below u (FORMAT.md step 5), packed LSB-first
  in groups of eight codes per ``bits`` bytes (FORMAT.md section 4).

For kind ``prod`` it also writes the residual's QJL signs: p = S r as an IEEE float32
``tl.dot`` (fused multiply-adds in some order; its error is within the bound FORMAT.md
section 5 allows a sign to move, 2(P-1)·2^-24 of sum |S_ij r_j|) and the residual norm.

``encode_gluon`` is the same encode with one row per thread (see its section below);
``decode_kernel`` and ``scores_kernel`` run on tensor cores (float32 tolerance).

Only imported when the ``"torch-triton"`` backend is used (and by the tests under
``TRITON_INTERPRET=1``, which runs the same kernels on the CPU).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

# Launch options that make the arithmetic the specification's (see the module docstring).
STRICT = {"enable_fp_fusion": False}
try:  # the option exists on Triton's NVIDIA backend; the interpreter ignores launch options
    from triton.backends.nvidia.compiler import CUDAOptions as _CUDAOptions

    if "enable_reflect_ftz" in _CUDAOptions.__dataclass_fields__:
        STRICT["enable_reflect_ftz"] = False
except Exception:  # pragma: no cover - other Triton builds
    pass


@triton.jit
def _butterfly(v, cols, H: tl.constexpr):
    """One FWHT stage: every pair (i, i + H) with i & H == 0 becomes (v_i + v_{i+H}, v_i - v_{i+H})."""
    other = tl.gather(v, tl.broadcast_to((cols ^ H)[:, None], v.shape), axis=0)
    return tl.where(((cols & H) != 0)[:, None], other - v, v + other)


@triton.jit
def _fwht(v, cols, LOG2P: tl.constexpr):
    """Unnormalized FWHT along axis 1, stages H = 1, 2, 4, ..., P/2 in that order."""
    for s in tl.static_range(LOG2P):
        v = _butterfly(v, cols, 1 << s)
    return v


@triton.jit
def _tree_sum(s, cols, LOG2P: tl.constexpr):
    """Halving tree over axis 1 (length P = 2**LOG2P): s_i += s_{i+half} for half = P/2, ..., 1.

    Done as a butterfly all-reduce (every lane adds its partner i ^ half): addition is
    commutative, so lane i ends with exactly the tree's value, the same in every lane."""
    P: tl.constexpr = 1 << LOG2P
    for k in tl.static_range(LOG2P):
        s = s + tl.gather(s, tl.broadcast_to((cols ^ (P >> (k + 1)))[:, None], s.shape), axis=0)
    return tl.max(s, axis=0)


@triton.jit
def _norm(y, cols, LOG2P: tl.constexpr):
    return tl.sqrt_rn(_tree_sum(y * y, cols, LOG2P))


@triton.jit
def _pow2(e):
    """2**e as float32 for int32 e in [-126, 127], from the exponent bits (exact)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _unrotate(c, signs_ptr, cols, P: tl.constexpr, LOG2P: tl.constexpr,
              ROUNDS: tl.constexpr):
    """FORMAT.md section 3's inverse rotation (before truncation): FWHT then signs, rounds reversed."""
    for i in tl.static_range(ROUNDS):
        c = _fwht(c, cols, LOG2P) * tl.load(signs_ptr + (ROUNDS - 1 - i) * P + cols)[:, None]
    return c * (1.0 / P)


@triton.jit
def _pack(idx, rows, rmask, out_ptr, R: tl.constexpr, P: tl.constexpr, BITS: tl.constexpr,
          BYTES_POW2: tl.constexpr):
    """Store (R, P) integer codes < 2**BITS as the LSB-first bit stream of FORMAT.md section 4:
    every 8 codes are one little-endian word of BITS bytes."""
    wide = tl.int64 if BITS > 4 else tl.int32  # 8 codes of <= 4 bits fill an int32 (bit 31 included)
    shifts = (tl.arange(0, 8) * BITS).to(wide)
    g = tl.reshape(idx.to(wide), [R, P // 8, 8])
    word = tl.sum(g << shifts[None, None, :], axis=2)  # disjoint bit fields: the sum is the or
    k = tl.arange(0, BYTES_POW2)
    byte = ((word[:, :, None] >> (8 * k).to(wide)[None, None, :]) & 255).to(tl.uint8)
    col = tl.arange(0, P // 8)[:, None] * BITS + k[None, :]
    offs = rows.to(tl.int64)[:, None, None] * (P // 8 * BITS) + col[None, :, :]
    mask = rmask[:, None, None] & (k < BITS)[None, None, :]
    tl.store(out_ptr + offs, byte, mask=mask)


@triton.jit(do_not_specialize=["stride_c"])
def encode_kernel(x_ptr, n, stride_x, stride_c, signs_ptr, bounds_ptr, cents_ptr, qjlt_ptr,
                  codes_ptr, norms_ptr, signs_out_ptr, rnorms_ptr,
                  DIM: tl.constexpr, P: tl.constexpr, LOG2P: tl.constexpr, ROUNDS: tl.constexpr,
                  BITS: tl.constexpr, BYTES_POW2: tl.constexpr, NC: tl.constexpr,
                  PROD: tl.constexpr, QN: tl.constexpr, R: tl.constexpr):
    rows = tl.program_id(0) * R + tl.arange(0, R)
    rmask = rows < n
    cols = tl.arange(0, P)
    x = tl.load(x_ptr + rows.to(tl.int64)[None, :] * stride_x + cols[:, None] * stride_c,
                mask=rmask[None, :] & (cols < DIM)[:, None], other=0.0).to(tl.float32)

    # 1. prescale by 2**-e, e = frexp(max|x|).exponent clamped to [-126, 126] (0 for a zero row)
    m = tl.max(tl.abs(x), axis=0)
    biased = (m.to(tl.int32, bitcast=True) >> 23) & 255
    e = tl.where(m == 0, 0, tl.minimum(tl.maximum(biased - 126, -126), 126))
    v = x * _pow2(-e)[None, :]
    # 2. rotate: (signs, FWHT) per round, then 1/P
    for r in tl.static_range(ROUNDS):
        v = _fwht(v * tl.load(signs_ptr + r * P + cols)[:, None], cols, LOG2P)
    y = v * (1.0 / P)
    # 3-4. norm and unit vector (u = +-0 for a zero row)
    rho = _norm(y, cols, LOG2P)
    u = tl.div_rn(y, tl.where(rho > 0, rho, 1.0)[None, :])
    pow2e = _pow2(e)

    if BITS > 0:
        # 5. codes: boundaries strictly below u; the centroid by the same comparisons
        idx = tl.zeros([P, R], tl.int32)
        c = tl.zeros([P, R], tl.float32) + tl.load(cents_ptr)
        for k in tl.static_range((1 << BITS) - 1):
            above = u > tl.load(bounds_ptr + k)
            idx += above.to(tl.int32)
            c = tl.where(above, tl.load(cents_ptr + k + 1), c)
        _pack(tl.trans(idx), rows, rmask, codes_ptr, R, P, BITS, BYTES_POW2)
        # 6. stored norm
        if NC:
            if DIM < P:
                kappa = _norm(tl.where((cols < DIM)[:, None],
                                       _unrotate(c, signs_ptr, cols, P, LOG2P, ROUNDS), 0.0),
                              cols, LOG2P)
            else:
                kappa = _norm(c, cols, LOG2P)
            stored = tl.div_rn(rho, kappa) * pow2e
            if PROD:
                c = tl.div_rn(c, kappa[None, :])
        else:
            stored = rho * pow2e
        tl.store(norms_ptr + rows, stored.to(norms_ptr.dtype.element_ty), mask=rmask)
        res = u - c
    else:
        res = u

    if PROD:
        # 7. residual norm and QJL signs of p = S r, QN output columns at a time
        gamma = (_norm(res, cols, LOG2P) * rho) * pow2e
        tl.store(rnorms_ptr + rows, gamma.to(rnorms_ptr.dtype.element_ty), mask=rmask)
        jn = tl.arange(0, QN)
        bit = tl.arange(0, 8)
        for q0 in tl.static_range(0, P, QN):
            st = tl.load(qjlt_ptr + cols[:, None] * P + (q0 + jn)[None, :])  # S^T[:, q0:q0+QN]
            proj = tl.dot(tl.trans(res), st, input_precision="ieee")
            g = tl.reshape((proj >= 0).to(tl.int32), [R, QN // 8, 8])
            byte = tl.sum(g << bit[None, None, :], axis=2).to(tl.uint8)
            offs = rows.to(tl.int64)[:, None] * (P // 8) + (q0 // 8 + tl.arange(0, QN // 8))[None, :]
            tl.store(signs_out_ptr + offs, byte, mask=rmask[:, None])



# ----------------------------------------------------------------- decode and inner products
# Not bit-specified (FORMAT.md section 3: float32 tolerance), so these run on tensor cores: the
# inverse rotation is one (P, P) matrix M = H D1 H D0 / P, whose entries k/P (|k| <= P) are exact
# in TF32.


@triton.jit
def _unpack(ptr, rows, rmask, BITS: tl.constexpr, ROW_BYTES: tl.constexpr, P: tl.constexpr):
    """(R, P) codes of BITS bits from the LSB-first rows of FORMAT.md section 4: every 8 codes are
    one little-endian word of BITS bytes, so a row is P / 8 words (BITS byte loads each)."""
    wide = tl.int64 if BITS > 4 else tl.int32  # bit 31 may be set: the final mask drops the sign
    base = ptr + rows.to(tl.int64)[:, None] * ROW_BYTES + (tl.arange(0, P // 8) * BITS)[None, :]
    w = tl.zeros([rows.shape[0], P // 8], wide)
    for k in tl.static_range(BITS):
        w |= tl.load(base + k, mask=rmask[:, None], other=0).to(wide) << (8 * k)
    shifts = (tl.arange(0, 8) * BITS).to(wide)
    return tl.reshape(((w[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)).to(tl.int32),
                      [rows.shape[0], P])


@triton.jit
def _centroids(idx, cents_ptr, BITS: tl.constexpr):
    """c[idx]: up to 16 centroids by a chain of selects (no per-element addresses), else a gather."""
    if BITS <= 4:
        c = tl.zeros(idx.shape, tl.float32) + tl.load(cents_ptr)
        for k in tl.static_range(1, 1 << BITS):
            c = tl.where(idx == k, tl.load(cents_ptr + k), c)
    else:
        c = tl.load(cents_ptr + idx)
    return c


@triton.jit
def _rotated_rows(codes_ptr, norms_ptr, cents_ptr, rows, rmask, BITS: tl.constexpr,
                  CODE_BYTES: tl.constexpr, P: tl.constexpr):
    """nu * c[idx]: the MSE part of the rotated estimate, (R, P) float32."""
    c = _centroids(_unpack(codes_ptr, rows, rmask, BITS, CODE_BYTES, P), cents_ptr, BITS)
    return c * tl.load(norms_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]


@triton.jit
def _signs(qjl_ptr, rows, rmask, P: tl.constexpr):
    """QJL sign bits of the rows as +-1.0, (R, P)."""
    return _unpack(qjl_ptr, rows, rmask, 1, P // 8, P).to(tl.float32) * 2.0 - 1.0


@triton.jit
def _tf32_split(v):
    """v = hi + lo with hi = v truncated to TF32 (10 mantissa bits) and lo exact: the two halves
    of a float32 operand for TF32 products against an operand that TF32 holds exactly."""
    hi = (v.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    return hi, v - hi


@triton.jit
def decode_kernel(codes_ptr, norms_ptr, qjl_ptr, rnorms_ptr, cents_ptr, m_ptr, smhi_ptr, smlo_ptr, out_ptr,
                  n, stride_out, qscale,
                  DIM: tl.constexpr, P: tl.constexpr, BITS: tl.constexpr, CODE_BYTES: tl.constexpr,
                  PROD: tl.constexpr, R: tl.constexpr, NB: tl.constexpr):
    """x = (nu c[idx]) M + (gamma sqrt(pi/2)/P) (2q - 1) (S M), NB output columns at a time.

    M (entries k/P) and the +-1 signs are exact in TF32; the other operand is split into two
    TF32 halves (_tf32_split; S M split on the host), so each product is a pair of TF32 tensor-core
    products with float32 accumulation: about 2^-20 relative, inside FORMAT.md's 1e-5."""
    rows = tl.program_id(0) * R + tl.arange(0, R)
    rmask = rows < n
    kk = tl.arange(0, P)
    if BITS > 0:
        y_hi, y_lo = _tf32_split(_rotated_rows(codes_ptr, norms_ptr, cents_ptr, rows, rmask, BITS, CODE_BYTES, P))
    if PROD:
        s = _signs(qjl_ptr, rows, rmask, P)
        g = tl.load(rnorms_ptr + rows, mask=rmask, other=0.0).to(tl.float32) * qscale
    jn = tl.arange(0, NB)
    for j0 in range(0, DIM, NB):  # a loop, not unrolled: one (P, NB) slice of M live at a time
        b_offs = kk[:, None] * P + (j0 + jn)[None, :]
        acc = tl.zeros([R, NB], tl.float32)
        if BITS > 0:
            mb = tl.load(m_ptr + b_offs)
            acc = tl.dot(y_hi, mb, acc, input_precision="tf32")
            acc = tl.dot(y_lo, mb, acc, input_precision="tf32")
        if PROD:
            z = tl.dot(s, tl.load(smhi_ptr + b_offs), input_precision="tf32")
            z = tl.dot(s, tl.load(smlo_ptr + b_offs), z, input_precision="tf32")
            acc += z * g[:, None]
        offs = rows.to(tl.int64)[:, None] * stride_out + (j0 + jn)[None, :]
        tl.store(out_ptr + offs, acc, mask=rmask[:, None] & ((j0 + jn) < DIM)[None, :])


@triton.jit
def scores_kernel(q_ptr, sq_ptr, codes_ptr, norms_ptr, qjl_ptr, rnorms_ptr, cents_ptr, out_ptr,
                  m, n, stride_out, qscale,
                  P: tl.constexpr, NCENT: tl.constexpr, BITS: tl.constexpr, CODE_BYTES: tl.constexpr,
                  PROD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """out[i, j] = nu_j <q~_i, c[idx_j]> + gamma_j sqrt(pi/2)/P <S q~_i, 2 q_j - 1> for BN packed
    rows and BM queries; the rows are never decoded to memory.

    Every float32 operand comes as two TF32 halves (hi + lo, split on the host: the rotated
    queries q~ and S q~ as (2, m, P), the centroids as (2, 2^b)), and a product is
    hi.hi + hi.lo + lo.hi on TF32 tensor cores, float32 accumulation (the +-1 signs are exact:
    two products).  Tiles are (rows, queries) so the packed rows fill the MMA's M dimension."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < n
    qi = tl.program_id(1) * BM + tl.arange(0, BM)
    qmask = qi < m
    kk = tl.arange(0, P)
    q_offs = kk[:, None] + qi[None, :] * P  # (P, BM): the queries transposed
    acc = tl.zeros([BN, BM], tl.float32)
    if BITS > 0:
        idx = _unpack(codes_ptr, rows, rmask, BITS, CODE_BYTES, P)
        c_hi = _centroids(idx, cents_ptr, BITS)
        q_hi = tl.load(q_ptr + q_offs, mask=qmask[None, :], other=0.0)
        q_lo = tl.load(q_ptr + m * P + q_offs, mask=qmask[None, :], other=0.0)
        acc = tl.dot(c_hi, q_hi, acc, input_precision="tf32")
        acc = tl.dot(c_hi, q_lo, acc, input_precision="tf32")
        acc = tl.dot(_centroids(idx, cents_ptr + NCENT, BITS), q_hi, acc, input_precision="tf32")
        acc = acc * tl.load(norms_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
    if PROD:
        sgn = _signs(qjl_ptr, rows, rmask, P)
        z = tl.dot(sgn, tl.load(sq_ptr + q_offs, mask=qmask[None, :], other=0.0), input_precision="tf32")
        z = tl.dot(sgn, tl.load(sq_ptr + m * P + q_offs, mask=qmask[None, :], other=0.0), z,
                   input_precision="tf32")
        acc += z * (tl.load(rnorms_ptr + rows, mask=rmask, other=0.0).to(tl.float32) * qscale)[:, None]
    offs = qi.to(tl.int64)[None, :] * stride_out + rows[:, None]
    tl.store(out_ptr + offs, acc, mask=rmask[:, None] & qmask[None, :])

# ----------------------------------------------------------------- Gluon: the same encode, one row per thread
# Plain Triton chooses the tile's layout itself and spreads a row over the lanes of a warp, so
# every butterfly stage became shuffles or shared-memory round trips (offline PTX, P = 128:
# 2.9e3 shuffles per thread).  Gluon (Triton's explicit-layout dialect) lets the tile be laid out
# as CuPy's kernel holds it, one row per thread, P coordinates in registers: then the reshapes,
# permutes, splits and joins of a stage are register renames and compile to nothing (offline
# PTX: no shuffle, no shared memory, no local memory).  Under Triton's interpreter the same source
# runs through tq/backends/_gluon_interp.py, so CI checks its bytes too.
if os.environ.get("TRITON_INTERPRET") == "1":  # Gluon has no interpreter: run its kernels as Triton's
    from . import _gluon_interp as gl

    gluon = gl
else:
    try:
        from triton.experimental import gluon
        from triton.experimental.gluon import language as gl
    except ImportError:  # pragma: no cover - Triton before 3.5
        gluon = gl = None

if gluon is not None:
    @gluon.jit
    def _g_butterfly(v, L: gl.constexpr, R: gl.constexpr, P: gl.constexpr, H: gl.constexpr):
        v = gl.permute(gl.reshape(v, [R, P // (2 * H), 2, H]), (0, 1, 3, 2))
        a, b = gl.split(v)
        v = gl.permute(gl.join(a + b, a - b), (0, 1, 3, 2))
        return gl.convert_layout(gl.reshape(v, [R, P]), L, assert_trivial=True)

    @gluon.jit
    def _g_fwht(v, L: gl.constexpr, R: gl.constexpr, P: gl.constexpr, LOG2P: gl.constexpr):
        for s in gl.static_range(LOG2P):
            v = _g_butterfly(v, L, R, P, 1 << s)
        return v

    @gluon.jit
    def _g_norm(y, L: gl.constexpr, R: gl.constexpr, P: gl.constexpr, LOG2P: gl.constexpr):
        return _g_tree_sqrt(y * y, L, R, P, LOG2P)

    @gluon.jit
    def _g_tree_sqrt(s, L: gl.constexpr, R: gl.constexpr, P: gl.constexpr, LOG2P: gl.constexpr):
        """sqrt of the halving-tree sum of each row of s (FORMAT.md step 3)."""
        for k in gl.static_range(LOG2P):  # the halving tree: s_i += s_{i+half}
            a, b = gl.split(gl.permute(gl.reshape(s, [R, 2, P >> (k + 1)]), (0, 2, 1)))
            s = a + b
        return gl.sqrt_rn(gl.convert_layout(gl.reshape(s, [R]), gl.SliceLayout(1, L)))

    @gluon.jit
    def _g_pow2(e):
        return ((e + 127) << 23).to(gl.float32, bitcast=True)

    @gluon.jit
    def _g_store_packed(idx, rows, rmask, codes_ptr, R: gl.constexpr, P: gl.constexpr, BITS: gl.constexpr,
                        NW: gl.constexpr):
        """FORMAT.md section 4: a thread's 8 consecutive codes form one little-endian word of BITS bytes."""
        L3: gl.constexpr = gl.BlockedLayout([1, P // 8, 8], [32, 1, 1], [NW, 1, 1], [2, 1, 0])
        g = gl.convert_layout(gl.reshape(idx.to(gl.int64) if BITS > 4 else idx, [R, P // 8, 8]), L3,
                              assert_trivial=True)
        shifts = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3))) * BITS
        w = gl.sum(g << shifts.to(g.dtype)[None, None, :], axis=2)  # disjoint bit fields: sum == or
        wl: gl.constexpr = gl.SliceLayout(2, L3)
        wrow = gl.convert_layout(rows, gl.SliceLayout(1, wl)).to(gl.int64)[:, None] * (P // 8 * BITS)
        wmask = gl.convert_layout(rmask, gl.SliceLayout(1, wl))[:, None]
        gcol = gl.arange(0, P // 8, layout=gl.SliceLayout(0, wl)) * BITS
        for k in gl.static_range(BITS):
            gl.store(codes_ptr + wrow + (gcol + k)[None, :], ((w >> (8 * k)) & 255).to(gl.uint8), mask=wmask)

    @gluon.jit
    def _g_store_qjl(res, rows, rmask, cols, qjl_ptr, signs_out_ptr, P: gl.constexpr, WB: gl.constexpr,
                     RL: gl.constexpr):
        """Sign bits of p = S r, WB outputs per word: p_i = sum_j S_ij r_j in the thread (S's row i is
        one broadcast load), added in the compiler's order, within FORMAT.md section 5's bound."""
        out = signs_out_ptr + rows.to(gl.int64) * (P // 8)
        for wi in range(P // WB):
            word = gl.zeros([rows.shape[0]], gl.int32, RL)
            for t in range(WB):  # a loop, not unrolled: one row of S live at a time
                srow = gl.load(qjl_ptr + (wi * WB + t) * P + cols)
                word = word | ((gl.sum(res * srow[None, :], axis=1) >= 0).to(gl.int32) << t)
            for k in gl.static_range(WB // 8):
                gl.store(out + wi * (WB // 8) + k, ((word >> (8 * k)) & 255).to(gl.uint8), mask=rmask)

    @gluon.jit
    def encode_gluon(x_ptr, n, stride_x, signs_ptr, bounds_ptr, cents_ptr, qjl_ptr, codes_ptr, norms_ptr,
                     signs_out_ptr, rnorms_ptr,
                     DIM: gl.constexpr, P: gl.constexpr, LOG2P: gl.constexpr, ROUNDS: gl.constexpr,
                     BITS: gl.constexpr, NC: gl.constexpr, PROD: gl.constexpr, NW: gl.constexpr):
        """encode_kernel with 32 * NW rows per program, one row per thread (NC needs DIM == P)."""
        R: gl.constexpr = 32 * NW
        L: gl.constexpr = gl.BlockedLayout([1, P], [32, 1], [NW, 1], [1, 0])
        RL: gl.constexpr = gl.SliceLayout(1, L)
        rows, cols, rmask = _g_tile(n, R, P, L)
        x = gl.load(x_ptr + rows.to(gl.int64)[:, None] * stride_x + cols[None, :],
                    mask=rmask[:, None] & (cols < DIM)[None, :], other=0.0).to(gl.float32)
        m = gl.max(gl.abs(x), axis=1)
        biased = (m.to(gl.int32, bitcast=True) >> 23) & 255
        e = gl.where(m == 0, 0, gl.minimum(gl.maximum(biased - 126, -126), 126))
        v = x * _g_pow2(-e)[:, None]
        for r in gl.static_range(ROUNDS):
            v = _g_fwht(v * gl.load(signs_ptr + r * P + cols)[None, :], L, R, P, LOG2P)
        y = v * (1.0 / P)
        rho = _g_norm(y, L, R, P, LOG2P)
        u = gl.div_rn(y, gl.where(rho > 0, rho, 1.0)[:, None])
        if BITS > 0:
            idx = gl.zeros([R, P], gl.int32, L)
            for k in gl.static_range((1 << BITS) - 1):
                idx += (u > gl.load(bounds_ptr + k)).to(gl.int32)
            if NC:  # kappa from the squares c[idx]^2: two P-vectors live, not three
                c0 = gl.load(cents_ptr)
                sq = gl.zeros([R, P], gl.float32, L) + c0 * c0
                for k in gl.static_range(1, 1 << BITS):
                    ck = gl.load(cents_ptr + k)
                    sq = gl.where(idx == k, ck * ck, sq)
                kappa = _g_tree_sqrt(sq, L, R, P, LOG2P)
                stored = gl.div_rn(rho, kappa) * _g_pow2(e)
            else:
                stored = rho * _g_pow2(e)
            gl.store(norms_ptr + rows, stored.to(norms_ptr.dtype.element_ty), mask=rmask)
            _g_store_packed(idx, rows, rmask, codes_ptr, R, P, BITS, NW)
            if PROD:  # the centroids again from u (cheaper than keeping idx, u and c live)
                c = gl.zeros([R, P], gl.float32, L) + gl.load(cents_ptr)
                for k in gl.static_range((1 << BITS) - 1):
                    c = gl.where(u > gl.load(bounds_ptr + k), gl.load(cents_ptr + k + 1), c)
                if NC:
                    c = gl.div_rn(c, kappa[:, None])
                res = u - c
        else:
            res = u
        if PROD:
            gamma = (_g_norm(res, L, R, P, LOG2P) * rho) * _g_pow2(e)
            gl.store(rnorms_ptr + rows, gamma.to(rnorms_ptr.dtype.element_ty), mask=rmask)
            _g_store_qjl(res, rows, rmask, cols, qjl_ptr, signs_out_ptr, P, 32 if P >= 32 else P, RL)

    @gluon.jit
    def _g_tile(n, R: gl.constexpr, P: gl.constexpr, L: gl.constexpr):
        """This program's rows (R of them, one per thread), the P columns each holds, the row mask."""
        rows = gl.program_id(0) * R + gl.arange(0, R, layout=gl.SliceLayout(1, L))
        return rows, gl.arange(0, P, layout=gl.SliceLayout(0, L)), rows < n

    @gluon.jit
    def _g_centroids(idx, cents_ptr, BITS: gl.constexpr):
        """c[idx] in idx's layout: up to 16 centroids by a chain of selects, else a gather."""
        if BITS <= 4:
            c = (idx * 0).to(gl.float32) + gl.load(cents_ptr)
            for k in gl.static_range(1, 1 << BITS):
                c = gl.where(idx == k, gl.load(cents_ptr + k), c)
        else:
            c = gl.load(cents_ptr + idx)
        return c

    @gluon.jit
    def _g_load_codes(codes_ptr, rows, rmask, R: gl.constexpr, P: gl.constexpr, BITS: gl.constexpr,
                      NW: gl.constexpr, L: gl.constexpr):
        """(R, P) codes, one row per thread: the inverse of _g_store_packed (FORMAT.md section 4)."""
        L3: gl.constexpr = gl.BlockedLayout([1, P // 8, 8], [32, 1, 1], [NW, 1, 1], [2, 1, 0])
        wl: gl.constexpr = gl.SliceLayout(2, L3)
        wide: gl.constexpr = gl.int64 if BITS > 4 else gl.int32  # bit 31 may be set: the mask drops the sign
        wrow = gl.convert_layout(rows, gl.SliceLayout(1, wl)).to(gl.int64)[:, None] * (P // 8 * BITS)
        wmask = gl.convert_layout(rmask, gl.SliceLayout(1, wl))[:, None]
        gcol = gl.arange(0, P // 8, layout=gl.SliceLayout(0, wl)) * BITS
        w = gl.zeros([R, P // 8], wide, wl)
        for k in gl.static_range(BITS):
            w |= gl.load(codes_ptr + wrow + (gcol + k)[None, :], mask=wmask, other=0).to(wide) << (8 * k)
        shifts = (gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3))) * BITS).to(wide)
        idx = ((w[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)).to(gl.int32)
        return gl.convert_layout(gl.reshape(idx, [R, P]), L, assert_trivial=True)

    @gluon.jit
    def decode_gluon(codes_ptr, norms_ptr, signs_ptr, cents_ptr, out_ptr, n, stride_out,
                     DIM: gl.constexpr, P: gl.constexpr, LOG2P: gl.constexpr, ROUNDS: gl.constexpr,
                     BITS: gl.constexpr, NW: gl.constexpr):
        """MSE decode with one row per thread, as FORMAT.md section 3 writes it: y = nu c[idx], then
        per round (last first) v = fwht(v) * signs, then v / P, the butterflies in registers
        (the reference's operations in its order).  The rows go out through a layout conversion
        (shared memory) so a warp's store is whole 512-byte rows, not 32 rows' scattered pieces."""
        R: gl.constexpr = 32 * NW
        L: gl.constexpr = gl.BlockedLayout([1, P], [32, 1], [NW, 1], [1, 0])
        rows, cols, rmask = _g_tile(n, R, P, L)
        idx = _g_load_codes(codes_ptr, rows, rmask, R, P, BITS, NW, L)
        c = _g_centroids(idx, cents_ptr, BITS)
        v = c * gl.load(norms_ptr + rows, mask=rmask, other=0.0).to(gl.float32)[:, None]
        for r in gl.static_range(ROUNDS):
            v = _g_fwht(v, L, R, P, LOG2P) * gl.load(signs_ptr + (ROUNDS - 1 - r) * P + cols)[None, :]
        v = v * (1.0 / P)
        SL: gl.constexpr = gl.BlockedLayout([1, 4], [32 * 4 // P, P // 4], [NW, 1], [1, 0])
        v = gl.convert_layout(v, SL)
        srows = gl.program_id(0) * R + gl.arange(0, R, layout=gl.SliceLayout(1, SL))
        scols = gl.arange(0, P, layout=gl.SliceLayout(0, SL))
        gl.store(out_ptr + srows.to(gl.int64)[:, None] * stride_out + scols[None, :], v,
                 mask=(srows < n)[:, None] & (scols < DIM)[None, :])

    @gluon.jit
    def scores_gluon(q_ptr, sq_ptr, codes_ptr, norms_ptr, qjl_ptr, rnorms_ptr, cents_ptr, out_ptr,
                     m, n, stride_out, qscale,
                     P: gl.constexpr, BITS: gl.constexpr, PROD: gl.constexpr, NW: gl.constexpr):
        """scores_kernel with one row per thread: the row's nu c[idx] stays in registers, and each query
        (a broadcast load of q~_i, and of S q~_i for prod) is one in-thread dot product, so the store
        of out[i, rows] is a warp's 32 consecutive floats.  Sums in the compiler's order (float32
        tolerance, FORMAT.md section 3)."""
        R: gl.constexpr = 32 * NW
        L: gl.constexpr = gl.BlockedLayout([1, P], [32, 1], [NW, 1], [1, 0])
        RL: gl.constexpr = gl.SliceLayout(1, L)
        rows, cols, rmask = _g_tile(n, R, P, L)
        if BITS > 0:
            idx = _g_load_codes(codes_ptr, rows, rmask, R, P, BITS, NW, L)
            c = _g_centroids(idx, cents_ptr, BITS)
            nu = gl.load(norms_ptr + rows, mask=rmask, other=0.0).to(gl.float32)
        if PROD:
            g = gl.load(rnorms_ptr + rows, mask=rmask, other=0.0).to(gl.float32) * qscale
        optr = out_ptr + rows.to(gl.int64)
        for i in range(m):  # a loop, not unrolled: one query row live at a time
            acc = gl.zeros([R], gl.float32, RL)
            if BITS > 0:
                acc = gl.sum(c * gl.load(q_ptr + i * P + cols)[None, :], axis=1) * nu
            if PROD:  # the signs again from the packed bits (two P-vectors would not fit registers)
                s = _g_load_codes(qjl_ptr, rows, rmask, R, P, 1, NW, L) != 0
                sq = gl.load(sq_ptr + i * P + cols)[None, :]
                acc += gl.sum(gl.where(s, sq, -sq), axis=1) * g
            gl.store(optr, acc, mask=rmask)
            optr += stride_out  # a 64-bit pointer step: i * stride_out could pass 2^31
