"""CuPy backend: CUDA C kernels (tq/kernels/quant_*.cu) compiled with cupy.RawModule.

* ``encode``: one fused kernel per batch (prescale, rotation, norm, codes, bit
  packing, stored norm, QJL signs and residual norm for ``prod``), bytes
  identical to the NumPy reference: every float operation is a round-to-nearest
  intrinsic and the module is compiled with ``-fmad=false`` (no fast math).
  The dense Haar rotation and QJL projection are accumulated sequentially as
  in the reference, so they are exact too.
* ``decode``: unpack, scale, QJL term, inverse rotation (float tolerance).
* ``scores``: inner products straight from packed codes: the queries are
  rotated once, then one kernel reads each packed row once and scores it
  against up to 16 queries per launch.

P = 8, 16, ..., 256 (``hadamard``; ``haar`` when dim = P) use the fast
register-resident kernels of quant_fast.cu, compiled per (P, bits, kind) on
first use; every other dimension uses the generic kernels of
quant_generic.cu (one block per row).

Accepts CuPy arrays and CUDA torch tensors (zero-copy through DLPack).  Given
torch tensors, it returns torch tensors (parts, decoded vectors, scores) and
runs on torch's current stream.  A NumPy array raises a TypeError: move it to
the GPU explicitly.
"""
from __future__ import annotations

import contextlib
import os
import functools
import warnings
from pathlib import Path

import numpy as np

from .base import Backend, Parts, register_backend

try:  # pragma: no cover - needs a GPU
    import cupy as cp
except Exception:  # pragma: no cover
    cp = None

_KDIR = Path(__file__).resolve().parent.parent / "kernels"
# Coordinates per thread (at most) of the fast encode and decode kernels (quant_fast.cu's
# TQQ_ENC_EMAX, TQQ_DEC_EMAX_MSE / _PROD): a row of P coordinates is owned by
# max(1, P / EMAX) threads.  The defaults are the fastest measured on an H200; the
# environment overrides exist for benchmarking (TQ_CUPY_DEC_EMAX sets both decoders).
def _env_int(var: str, default: int, allowed) -> int:
    raw = os.environ.get(var, str(default))
    try:
        v = int(raw)
    except ValueError:
        raise ValueError(f"{var} must be an integer, not {raw!r}") from None
    if v not in allowed:
        raise ValueError(f"{var} must be one of {list(allowed)}, not {v}")
    return v


_EMAX_CHOICES = (32, 64, 128, 256)
ENC_EMAX = _env_int("TQ_CUPY_ENC_EMAX", 128, _EMAX_CHOICES)
DEC_EMAX = {"mse": _env_int("TQ_CUPY_DEC_EMAX", 128, _EMAX_CHOICES),
            "prod": _env_int("TQ_CUPY_DEC_EMAX", 32, _EMAX_CHOICES)}
ENC_MINB = _env_int("TQ_CUPY_ENC_MINB", 3, range(1, 17))  # resident blocks the MSE encoder is built for
DECODE_WP = 36  # decode output staging pitch in floats (TQQ_WP): a 32-column slice per thread
# QJL projection of the fast encoder: "mma" (tensor cores, float32 accuracy from split
# float16 operands; signs within FORMAT.md section 5's rounding bound of the reference)
# or "exact" (the reference's sequential order: bit-identical signs, about 10x slower)
QJL_IMPL = os.environ.get("TQ_CUPY_QJL", "mma")
if QJL_IMPL not in ("mma", "exact"):
    raise ValueError(f"TQ_CUPY_QJL must be 'mma' or 'exact', not {QJL_IMPL!r}")
# 16-row tiles per warp pass of the tensor-core QJL projection: 2 reuses each S fragment
# twice but spills; 1 measured faster on an H100 (15.5 against 17.9 ms, qjl_mma_encode_mg*_b2_h100.md)
QJL_MG = _env_int("TQ_CUPY_QJL_MG", 1, (1, 2))
_BASE_OPTIONS = ("--std=c++17", "-fmad=false")


def kernel_defines() -> tuple:
    """The -D options the fast kernels are compiled with (the launch geometry above)."""
    return (f"-DTQQ_ENC_EMAX={ENC_EMAX}", f"-DTQQ_DEC_EMAX_MSE={DEC_EMAX['mse']}",
            f"-DTQQ_DEC_EMAX_PROD={DEC_EMAX['prod']}", f"-DTQQ_ENC_MINB_MSE={ENC_MINB}", f"-DTQQ_WP={DECODE_WP}",
            f"-DTQQ_QJL_MMA={int(QJL_IMPL == 'mma')}", f"-DTQQ_QJL_MG={QJL_MG}")


FAST_P = (8, 16, 32, 64, 128, 256)
_DTYPE_CODE = {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3}
_F_NORM_F16, _F_NC, _F_HAAR, _F_PROD = 1, 2, 4, 8
_NT, _NTG, _QC = 128, 256, 16
_TAB_BYTES = 576 * 4
_SMEM_LIMIT = 200 * 1024


# ----------------------------------------------------------------- compilation
def _source(name: str) -> str:
    text = (_KDIR / name).read_text()
    header = (_KDIR / "quant_common.cuh").read_text()
    return text.replace('#include "quant_common.cuh"', header)


@functools.lru_cache(maxsize=None)
def _generic_module():
    return cp.RawModule(code=_source("quant_generic.cu"), options=_BASE_OPTIONS)


@functools.lru_cache(maxsize=None)
def _generic(name: str):
    return _generic_module().get_function(name)


FAST_KERNELS: dict = {}  # (kind, P, B, prod) -> compiled kernel, for diagnostics


def _fast(kind: str, p: int, b: int, prod: bool):
    key = (kind, p, b, prod)
    if key not in FAST_KERNELS:
        expr = f"tqq_{kind}<{p}, {b}, {'true' if prod else 'false'}>"
        options = _BASE_OPTIONS + kernel_defines()
        mod = cp.RawModule(code=_source("quant_fast.cu"), options=options, name_expressions=[expr])
        FAST_KERNELS[key] = mod.get_function(expr)
    return FAST_KERNELS[key]


def _launch(kern, grid, block, args, smem, static_smem=0):
    """Launch; past 48 KB of shared memory (static + dynamic) the dynamic limit is raised first."""
    if smem + static_smem > 48 * 1024:
        key = ("smem", id(kern), cp.cuda.runtime.getDevice())
        kept, done = _SMEM_SET.get(key, (None, 0))
        if kept is not kern or done < smem:  # the entry holds kern, so its id is not reused
            kern.max_dynamic_shared_size_bytes = int(smem)
            _SMEM_SET[key] = (kern, smem)
    kern((int(grid),), (int(block),), args, shared_mem=int(smem))


_SMEM_SET: dict = {}


@functools.lru_cache(maxsize=None)
def _num_sms(dev: int) -> int:
    return int(cp.cuda.runtime.getDeviceProperties(dev)["multiProcessorCount"])


# ----------------------------------------------------------------- arrays
def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _torch():
    import torch

    return torch


def _cp_view(t):
    """Zero-copy CuPy view of a torch CUDA tensor (bfloat16 reinterpreted as int16)."""
    torch = _torch()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return cp.from_dlpack(t)


def _dtype_name(x) -> str:
    if _is_torch(x):
        return str(x.dtype).replace("torch.", "")
    return x.dtype.name


def _device_of(x) -> int:
    if _is_torch(x):
        return x.device.index if x.device.index is not None else _torch().cuda.current_device()
    return x.device.id


@contextlib.contextmanager
def _context(x):
    """Run on x's device; for torch tensors also on torch's current stream."""
    dev = _device_of(x)
    with cp.cuda.Device(dev):
        if _is_torch(x):
            s = _torch().cuda.current_stream(dev)
            with warnings.catch_warnings():  # CuPy 14 deprecates ExternalStream (still works)
                warnings.simplefilter("ignore", DeprecationWarning)
                ext = cp.cuda.ExternalStream(s.cuda_stream, dev)
            with ext:
                yield dev
        else:
            yield dev


class _Alloc:
    """Allocate outputs as torch tensors (torch mode) or CuPy arrays; hand CuPy views to kernels."""

    def __init__(self, like, dev):
        self.torch = _is_torch(like)
        self.dev = dev

    def empty(self, shape, dtype: str):
        if self.torch:
            torch = _torch()
            return torch.empty(shape, dtype=getattr(torch, dtype), device=f"cuda:{self.dev}")
        return cp.empty(shape, dtype=dtype)

    @staticmethod
    def view(a):
        return _cp_view(a) if _is_torch(a) else a


def _raw(a):
    """A CuPy array for kernel arguments (zero-copy for torch)."""
    return _cp_view(a) if _is_torch(a) else a


def _params(plan, dev: int):
    def make():
        def up(a):
            return None if a is None else cp.asarray(np.ascontiguousarray(a, dtype=np.float32))

        return {
            "signs": up(plan.signs),
            "m": up(plan.matrix),  # decode: x = y @ M
            "mt": None if plan.matrix is None else up(plan.matrix.T),  # encode: Mt[j][i] = M[i][j]
            "s": up(plan.qjl_matrix),  # decode: z = signs @ S
            "st": None if plan.qjl_matrix is None else up(plan.qjl_matrix.T),
            "cent": up(plan.centroids),
            "bnd": up(plan.boundaries),
            "dummy": cp.zeros(16, dtype=np.float32),
        }

    with cp.cuda.Device(dev):
        return plan.cached(("cupy", dev), make)


def _mma_tables(plan, prm):
    if "mma_tab" not in prm:
        words, cinv = mma_scores_tables(plan.centroids, plan.config.mse_bits)
        prm["mma_tab"] = {"words": cp.asarray(words), "cinv": cinv}
    return prm["mma_tab"]


def _or(a, prm):
    return prm["dummy"] if a is None else a


def _fast_ok(plan) -> bool:
    p = plan.padded_dim
    return p in FAST_P and (plan.signs is not None or plan.dim == p)


def _flags(plan) -> int:
    cfg = plan.config
    f = 0
    if cfg.norm_dtype == "float16":
        f |= _F_NORM_F16
    if cfg.norm_correction:
        f |= _F_NC
    if plan.signs is None:
        f |= _F_HAAR
    if cfg.kind == "prod":
        f |= _F_PROD
    return f


# Launch geometry, shared by the kernels' callers and the host-emulation tests.
def tile_rows(p: int, emax: int) -> int:
    """Rows per tile of a fast kernel with at most ``emax`` coordinates per thread."""
    return _NT // max(1, p // emax)


def fast_encode_smem(p: int, d: int, itemsize: int, prod: bool, haar: bool) -> int:
    tr, ap = tile_rows(p, ENC_EMAX), p + 4
    spb = ((((d * itemsize) + 15) >> 4) | 1) << 4  # odd number of 16-byte units per staged row
    xbytes = tr * ap * 4 if (prod or haar) else 0
    r1 = max(tr * spb, xbytes)
    return (2 * p + 512 + 16 * _NT) * 4 + (r1 + 15) // 16 * 16 + (tr * ap * 4 if haar else 0)


def fast_decode_smem(p: int, prod: bool, haar: bool) -> int:
    staging = _NT * DECODE_WP * 4
    tr = tile_rows(p, DEC_EMAX["prod" if prod else "mse"])
    return (2 * p + 512) * 4 + staging + (2 * tr * (p + 4) * 4 if (prod or haar) else 0)


def fast_scores_smem(p: int, mc: int, prod: bool) -> int:
    return (256 + mc * p * (2 if prod else 1)) * 4


MMA_P = (32, 64, 128, 256)  # tqq_scores_mma: padded dims and at most 4 MSE bits
MMA_MAX_BITS = 4
# "auto" (tensor cores where tqq_scores_mma applies), "mma" (the same) or "fma" (the
# float32 kernel everywhere: the A/B baseline of benchmarks/bench_gpu.py)
SCORES_IMPL = os.environ.get("TQ_CUPY_SCORES", "auto")


def mma_scores_ok(plan) -> bool:
    return (SCORES_IMPL != "fma" and _fast_ok(plan) and plan.padded_dim in MMA_P
            and plan.config.mse_bits <= MMA_MAX_BITS)


def mma_scores_smem(p: int, b: int, prod: bool) -> int:
    """Dynamic shared bytes of tqq_scores_mma (layout in quant_fast.cu; the tables are static)."""
    frag = (p // 16) * 2 * 32 * 16
    return (frag if b else 0) + (frag if prod else 0) + 16 * p * 4 + 32 * 4


def mma_scores_static_smem(b: int) -> int:
    """Static shared bytes of tqq_scores_mma: the replicated pair table (QJL signs are
    turned into operands arithmetically, tqq_sign_frag)."""
    return (1 << (2 * b)) * 128 if b else 0


def _pow2_scale(x) -> int:
    """e such that max |x| 2^e lies in [256, 512) (0 for an all-zero x): the scale of the
    split float16 operands of the tensor-core kernels, so no hi or lo part under- or overflows."""
    mx = float(np.max(np.abs(x)))
    return 0 if mx == 0 else 9 - int(np.frexp(mx)[1])


def _i8(x, scale):
    return np.clip(np.rint(np.asarray(x, np.float64) * scale), -127, 127).astype(np.int8).view(np.uint8).astype(np.uint32)


def mma_scores_tables(centroids, bits: int):
    """(uint32 words of the replicated pair table, 1 / centroid scale).

    Centroids are scaled by 2^e (max |c| to [256, 512)) and split c = c_hi + c_lo,
    c_hi = float16(c).  Pair entry e = a | b << bits (codes of coordinates 2j, 2j+1),
    8 bytes: the half2 word (c_hi[a], c_hi[b]) and the int8 word
    (c_lo[a] 2^10, c_lo[b] 2^10, c_hi[a] / 4, c_hi[b] / 4), each rounded and clamped
    to +-127.  Each entry is stored 16 times, copy i at byte e * size * 16 + i * size (lane l reads copy l % 16).
    """
    words = []
    cinv = 1.0
    if bits:
        c = np.asarray(centroids, dtype=np.float32)
        e = _pow2_scale(c)
        cs = (c * np.float32(2.0 ** e)).astype(np.float32)
        hi = cs.astype(np.float16)
        lo = cs - hi.astype(np.float32)
        hv = hi.view(np.uint16).astype(np.uint32)
        lo8, hi8 = _i8(lo, 1024.0), _i8(hi.astype(np.float32), 0.25)
        idx = np.arange(1 << (2 * bits))
        a, b = idx & ((1 << bits) - 1), idx >> bits
        pair = np.stack([hv[a] | hv[b] << 16, lo8[a] | lo8[b] << 8 | hi8[a] << 16 | hi8[b] << 24], axis=1)
        words.append(np.repeat(pair[:, None, :], 16, axis=1).reshape(-1))
        cinv = 2.0 ** -e
    out = np.concatenate(words).astype(np.uint32) if words else np.zeros(4, np.uint32)
    return out, cinv


def qjl_mma_ok(plan, op: str = "encode") -> bool:
    """Whether the fast encoder (op="encode") or decoder ("decode") runs the QJL product on
    tensor cores (quant_fast.cu's TQQQjlMma: padded dims 32..256, whole 16-row tiles)."""
    p = plan.padded_dim
    emax = ENC_EMAX if op == "encode" else DEC_EMAX["prod"]
    return (QJL_IMPL == "mma" and plan.config.kind == "prod" and _fast_ok(plan) and p in MMA_P
            and tile_rows(p, emax) % 16 == 0)


def qjl_mma_fragments(qjl_matrix) -> tuple[np.ndarray, float]:
    """(B fragments of the QJL matrix for tqq_mma_signs: uint32 [P/8, P/16, 32, 4], 2^-e).

    S is scaled by 2^e (max |S| to [256, 512)) and split S = hi + lo with hi = float16(S)
    and lo = float16(S - hi).  Entry [n, s, lane] for lane = 4 g + t holds, as float16
    pairs (first element in the low half), b0 = S[i][j], S[i][j + 1] and b1 = S[i][j + 8],
    S[i][j + 9] of hi, then the same of lo, with i = 8 n + g and j = 16 s + 2 t (the
    m16n8k16 B fragment of B[k][n] = S[8 n_tile + n][16 s + k]).
    """
    m = np.asarray(qjl_matrix, dtype=np.float32)
    p = m.shape[0]
    e = _pow2_scale(m)
    ms = (m * np.float32(2.0 ** e)).astype(np.float32)
    hi = ms.astype(np.float16)
    lo = (ms - hi.astype(np.float32)).astype(np.float16)
    g, t = np.arange(32) // 4, np.arange(32) % 4
    i = 8 * np.arange(p // 8)[:, None, None] + g[None, None, :]          # [n, 1, lane]
    j = 16 * np.arange(p // 16)[None, :, None] + 2 * t[None, None, :]    # [1, s, lane]

    def pair(h, jj):
        return h[i, jj].view(np.uint16).astype(np.uint32) | h[i, jj + 1].view(np.uint16).astype(np.uint32) << 16

    return np.stack([pair(hi, j), pair(hi, j + 8), pair(lo, j), pair(lo, j + 8)], axis=-1), 2.0 ** -e


def _qjl_frags(plan, prm, op: str = "encode"):
    """Device fragments of 2^e S (encode: p = S r) or of 2^e S^T (decode: z = s S), and 2^-e."""
    key = "qjl_frag_" + op
    if key not in prm:
        m = plan.qjl_matrix if op == "encode" else plan.qjl_matrix.T
        words, inv = qjl_mma_fragments(m)
        prm[key] = (cp.asarray(np.ascontiguousarray(words)), inv)
    return prm[key]


def generic_scratch_bytes(w: int) -> int:
    return 3 * w * 4 + ((w + 15) // 16) * 16


def _generic_scratch(w: int, blocks: int):
    """(dynamic shared bytes, global scratch or None, per-block stride) for the generic kernels."""
    need = generic_scratch_bytes(w)
    if _TAB_BYTES + need <= _SMEM_LIMIT:
        return _TAB_BYTES + need, None, 0
    stride = (need + 255) // 256 * 256
    return _TAB_BYTES, cp.empty(blocks * stride, dtype=np.uint8), stride


def _i64(v):
    return np.int64(v)


def _i32(v):
    return np.int32(v)


# ----------------------------------------------------------------- kernels
def encode(plan, x) -> Parts:
    cfg = plan.config
    with _context(x) as dev:
        prm = _params(plan, dev)
        alloc = _Alloc(x, dev)
        n, d = int(x.shape[0]), int(x.shape[1])
        p, b = plan.padded_dim, cfg.mse_bits
        prod = cfg.kind == "prod"
        nd = cfg.norm_dtype
        codes = alloc.empty((n, plan.code_bytes), "uint8")
        norms = alloc.empty((n if b > 0 else 0,), nd)
        qjl = alloc.empty((n, plan.qjl_bytes), "uint8")
        rnorms = alloc.empty((n if prod else 0,), nd)
        if n == 0:
            return Parts(codes, norms, qjl, rnorms)
        dt = _DTYPE_CODE[_dtype_name(x)]
        xc = _raw(x)
        if xc.strides[1] != xc.itemsize or xc.strides[0] % xc.itemsize:
            xc = cp.ascontiguousarray(xc)
        sz = xc.itemsize
        ldx = xc.strides[0]
        flags = _flags(plan)
        outs = [_raw(a) if _size(a) else prm["dummy"] for a in (codes, norms, qjl, rnorms)]
        if _fast_ok(plan):
            tr = tile_rows(p, ENC_EMAX)
            vec = int((d * sz) % 16 == 0 and ldx % 16 == 0 and xc.data.ptr % 16 == 0)
            haar = plan.signs is None
            smem = fast_encode_smem(p, d, sz, prod, haar)
            tiles = -(-n // tr)
            grid = min(tiles, _num_sms(dev) * (8 if (prod or haar) else 32))
            kern = _fast("encode", p, b, prod)
            qmat = _qjl_frags(plan, prm)[0] if qjl_mma_ok(plan) else prm["st"]
            args = (xc, _i64(n), _i32(d), _i64(ldx), _i32(dt), _i32(flags), _i32(vec),
                    _or(prm["signs"], prm), _or(prm["mt"], prm), _or(qmat, prm),
                    _or(prm["cent"], prm), _or(prm["bnd"], prm), *outs)
            _launch(kern, grid, _NT, args, smem)
        else:
            w = 1 << max(0, (p - 1).bit_length())
            grid = min(n, _num_sms(dev) * 8)
            smem, scratch, stride = _generic_scratch(w, grid)
            args = (xc, _i64(n), _i32(d), _i64(ldx), _i32(dt), _i32(flags), _i32(p), _i32(w), _i32(b),
                    _or(prm["signs"], prm), _or(prm["mt"], prm), _or(prm["st"], prm),
                    _or(prm["cent"], prm), _or(prm["bnd"], prm), *outs,
                    _i32(plan.code_bytes), _i32(plan.qjl_bytes),
                    scratch if scratch is not None else prm["dummy"], _i64(stride))
            _launch(_generic("tqq_encode_generic"), grid, _NTG, args, smem)
        return Parts(codes, norms, qjl, rnorms)


def _size(a) -> int:
    return a.numel() if _is_torch(a) else a.size


def _part_args(parts, prm):
    """Kernel arguments for the four sections: contiguous, 16-byte aligned CuPy views."""

    def one(a):
        if not _size(a):
            return prm["dummy"]
        c = _raw(a)
        if not c.flags.c_contiguous or c.data.ptr % 16:
            c = cp.array(c, order="C", copy=True)  # fresh allocations are 256-byte aligned
        return c

    return [one(a) for a in (parts.codes, parts.norms, parts.qjl, parts.rnorms)]


def decode(plan, parts):
    cfg = plan.config
    like = parts.codes
    with _context(like) as dev:
        prm = _params(plan, dev)
        alloc = _Alloc(like, dev)
        n, d, p, b = int(parts.codes.shape[0]), plan.dim, plan.padded_dim, cfg.mse_bits
        prod = cfg.kind == "prod"
        out = alloc.empty((n, d), "float32")
        if n == 0:
            return out
        pa = _part_args(parts, prm)
        flags = _flags(plan)
        qscale = np.float32(plan.qjl_scale)
        if _fast_ok(plan):
            tr = tile_rows(p, DEC_EMAX[cfg.kind])
            smem = fast_decode_smem(p, prod, plan.signs is None)
            grid = min(-(-n // tr), _num_sms(dev) * 16)
            qmat = prm["s"]
            if qjl_mma_ok(plan, "decode"):
                qmat, inv = _qjl_frags(plan, prm, "decode")
                qscale = np.float32(qscale * inv)  # exact: a power of two
            args = (*pa, _i64(n), _i32(d), _i32(flags), _or(prm["signs"], prm), _or(prm["m"], prm),
                    _or(qmat, prm), _or(prm["cent"], prm), qscale, _raw(out))
            _launch(_fast("decode", p, b, prod), grid, _NT, args, smem)
        else:
            w = 1 << max(0, (p - 1).bit_length())
            grid = min(n, _num_sms(dev) * 8)
            smem, scratch, stride = _generic_scratch(w, grid)
            args = (*pa, _i64(n), _i32(d), _i32(flags), _i32(p), _i32(w), _i32(b),
                    _i32(plan.code_bytes), _i32(plan.qjl_bytes), _or(prm["signs"], prm), _or(prm["m"], prm),
                    _or(prm["s"], prm), _or(prm["cent"], prm), qscale, _raw(out),
                    scratch if scratch is not None else prm["dummy"], _i64(stride))
            _launch(_generic("tqq_decode_generic"), grid, _NTG, args, smem)
        return out


def rotate_queries(plan, q, prm, dev):
    """Rotated queries (m, P) float32 CuPy array: the same rotation as encoding, no prescale."""
    m, d, p = int(q.shape[0]), plan.dim, plan.padded_dim
    out = cp.empty((m, p), dtype=np.float32)
    if m == 0:
        return out
    w = 1 << max(0, (p - 1).bit_length())
    grid = min(m, _num_sms(dev) * 8)
    smem, scratch, stride = _generic_scratch(w, grid)
    args = (q, _i64(m), _i32(d), _i32(p), _i32(w), _i32(_flags(plan)), _or(prm["signs"], prm),
            _or(prm["mt"], prm), out, scratch if scratch is not None else prm["dummy"], _i64(stride))
    _launch(_generic("tqq_rotate_generic"), grid, _NTG, args, smem)
    return out


def scores(plan, q, parts):
    cfg = plan.config
    like = parts.codes
    with _context(like) as dev:
        prm = _params(plan, dev)
        alloc = _Alloc(like if _is_torch(like) else q, dev)
        n, p, b = int(parts.codes.shape[0]), plan.padded_dim, cfg.mse_bits
        prod = cfg.kind == "prod"
        m = int(q.shape[0])
        out = alloc.empty((m, n), "float32")
        if n == 0 or m == 0:
            return out
        if _is_torch(q):
            qc = _cp_view(q.to(dtype=_torch().float32).contiguous())
        else:
            qc = cp.ascontiguousarray(q, dtype=np.float32)
        qr = rotate_queries(plan, qc, prm, dev)
        sq = qr @ prm["st"] if prod else prm["dummy"]  # (S qr)_i = sum_j S_ij qr_j = (qr @ S^T)_i
        if prod:
            sq = cp.ascontiguousarray(sq)
        pa = _part_args(parts, prm)
        flags = _flags(plan)
        qscale = np.float32(plan.qjl_scale)
        oc = _raw(out)
        if mma_scores_ok(plan):
            tab = _mma_tables(plan, prm)
            kern = _fast("scores_mma", p, b, prod)
            smem = mma_scores_smem(p, b, prod)
            blocks_per_sm = 3 if (prod or p > 128) else 4
            grid = min(-(-n // (32 * 4)), _num_sms(dev) * blocks_per_sm)
            for q0 in range(0, m, _QC):
                mc = min(_QC, m - q0)
                args = (*pa, _i64(n), _i32(flags), qr[q0:q0 + mc], sq[q0:q0 + mc] if prod else sq,
                        _i32(mc), tab["words"], np.float32(tab["cinv"]), qscale, oc[q0:q0 + mc])
                _launch(kern, grid, _NT, args, smem, mma_scores_static_smem(b))
        elif _fast_ok(plan):
            tr = tile_rows(p, 128)  # tqq_scores: TQQShape<P> default
            grid = min(-(-n // tr), _num_sms(dev) * 16)
            kern = _fast("scores", p, b, prod)
            for q0 in range(0, m, _QC):
                mc = min(_QC, m - q0)
                smem = fast_scores_smem(p, mc, prod)
                args = (*pa, _i64(n), _i32(flags), qr[q0:q0 + mc], sq[q0:q0 + mc] if prod else sq,
                        _i32(mc), _or(prm["cent"], prm), qscale, oc[q0:q0 + mc])
                _launch(kern, grid, _NT, args, smem)
        else:
            w = 1 << max(0, (p - 1).bit_length())
            grid = min(n, _num_sms(dev) * 8)
            smem, scratch, stride = _generic_scratch(w, grid)
            args = (*pa, _i64(n), _i32(flags), _i32(p), _i32(w), _i32(b), _i32(plan.code_bytes),
                    _i32(plan.qjl_bytes), qr, sq, _i32(m), _or(prm["cent"], prm), qscale, oc,
                    scratch if scratch is not None else prm["dummy"], _i64(stride))
            _launch(_generic("tqq_scores_generic"), grid, _NTG, args, smem)
        return out


# ----------------------------------------------------------------- backend
@register_backend
class CupyBackend(Backend):
    """CUDA kernels through CuPy; CuPy arrays or CUDA torch tensors in, the same type out."""

    name = "cupy"
    install_hint = "It needs an NVIDIA GPU and CuPy: `pip install tq[cuda12]` or `tq[cuda13]`."

    @classmethod
    def is_available(cls) -> bool:
        if cp is None:
            return False
        try:
            return cp.cuda.runtime.getDeviceCount() > 0
        except Exception:
            return False

    def owns(self, x) -> bool:
        if cp is not None and isinstance(x, cp.ndarray):
            return True
        return _is_torch(x) and getattr(x, "is_cuda", False)

    def asarray(self, x):
        if isinstance(x, cp.ndarray):
            return x
        if _is_torch(x):
            if not getattr(x, "is_cuda", False):
                raise TypeError(
                    "backend 'cupy' got a torch tensor on the CPU; move it to a CUDA device "
                    "(tensor.cuda()) or use backend='torch'"
                )
            return x
        if hasattr(x, "__cuda_array_interface__"):
            return cp.asarray(x)  # zero-copy view of another GPU array
        raise TypeError(
            f"backend 'cupy' needs a CuPy array or a CUDA torch tensor, got {type(x).__module__}."
            f"{type(x).__name__}; copy it to the GPU first (cupy.asarray(x)) or use backend='numpy'"
        )

    def shape_dtype(self, x):
        return tuple(int(s) for s in x.shape), _dtype_name(x)

    def all_finite(self, x) -> bool:
        if _is_torch(x):
            return x.numel() == 0 or bool(_torch().isfinite(x).all())
        return x.size == 0 or bool(cp.isfinite(x).all())

    def to_numpy(self, a):
        if _is_torch(a):
            torch = _torch()
            a = a.detach()
            if a.dtype == torch.bfloat16:
                a = a.to(torch.float32)
            return a.cpu().numpy()
        return cp.asnumpy(a)

    def from_numpy(self, a, device=None):
        if cp is not None and isinstance(device, cp.cuda.Device):
            device = device.id
        if device is not None and not isinstance(device, (int, np.integer)):
            # a torch device (or "cuda:k") asks for torch tensors on it
            torch = _torch()
            return torch.as_tensor(np.ascontiguousarray(a), device=device)
        with cp.cuda.Device(int(device) if device is not None else cp.cuda.runtime.getDevice()):
            return cp.asarray(np.ascontiguousarray(a))

    def encode(self, plan, x):
        return encode(plan, x)

    def decode(self, plan, parts):
        return decode(plan, parts)

    def scores(self, plan, q, parts):
        return scores(plan, q, parts)
