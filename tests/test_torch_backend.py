"""The torch backend (CPU tensors here; CUDA in test_gpu_backends.py) against the NumPy reference.

docs/FORMAT.md section 5: with the hadamard rotation the encoding is
bit-identical (``tobytes()``), except the QJL signs of ``prod``, which come
from a matmul: a sign may differ only where |p_i| <= g * sum_j |S_ij r_j|, with
g = max(2**-16, 2**-23 * P).  With ``haar`` the rotation is a matmul too: a code
may differ only where u_j lies within tau = g * (sum_k |M_jk xs_k|) / rho of a
boundary, norms agree to a relative g before rounding to norm_dtype, and a row
with a differing code may differ in everything computed from its codes (the
corrected norm, the residual norm, its QJL signs).  Decoding and inner
products agree to float32 tolerance (relative 1e-5 of the vector norms).

The checking helpers here are shared with tests/test_gpu_backends.py.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

torch = pytest.importorskip("torch")

import tq  # noqa: E402
from tq.backends import numpy_backend as ref  # noqa: E402
from tq.backends.base import Parts  # noqa: E402
from tq.packing import unpack_bits  # noqa: E402

DIMS = st.one_of(st.sampled_from([2, 3, 5, 8, 16, 31, 64, 96, 100, 127, 128, 129, 256, 300]), st.integers(2, 300))
SCALES = ("unit", "tiny", "huge", "subnormal", "mixed", "zeros", "one_hot")
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def tol(p: int) -> float:
    """FORMAT.md section 5: relative rounding distance allowed for a P-term dense product,
    max(2**-16, 2**-23 * P) (two float32 sums of P terms in different orders)."""
    return ref.dense_tolerance(p)


# ----------------------------------------------------------------- shared helpers
def make_input(rng, n, d, scale, dtype):
    """float64 rows of a magnitude class that ``dtype`` can hold."""
    x = rng.standard_normal((n, d))
    if scale == "tiny":
        x *= 1e-30
    elif scale == "huge":
        x *= 1e30
    elif scale == "subnormal":
        x *= 1e-41
    elif scale == "zeros":
        x[...] = 0
    elif scale == "one_hot":
        x = np.zeros((n, d))
        if n:
            x[np.arange(n), rng.integers(0, d, n)] = rng.choice([-3.0, 2.0, 1e20], size=n)
    elif scale == "mixed":
        lo, hi = (-4, 4) if dtype in ("float16", "bfloat16") else (-30, 30)
        x *= 10.0 ** rng.uniform(lo, hi, size=(n, 1))
        x[rng.random(n) < 0.15] = 0
        one = rng.random(n) < 0.15
        x[one] = 0
        x[one, 0] = 1.5
    if dtype in ("float16", "bfloat16") and scale in ("huge", "subnormal", "tiny"):
        x = rng.standard_normal((n, d)) * (1e3 if scale == "huge" else 1e-3)
    if dtype == "float16":
        x = np.clip(x, -6e4, 6e4)
    return x


def as_dtype(x64, dtype):
    """(torch CPU tensor of ``dtype``, the same values as the reference's float32/float64 input)."""
    if dtype == "bfloat16":
        t = torch.from_numpy(x64.astype(np.float32)).to(torch.bfloat16)
        return t, t.to(torch.float32).numpy()
    a = x64.astype(dtype)
    return torch.from_numpy(a), a


def to_np(a):
    if isinstance(a, np.ndarray):
        return a
    if type(a).__module__.startswith("torch"):
        return a.detach().cpu().numpy()
    return a.get()  # cupy


def np_parts(p: Parts) -> Parts:
    return Parts(*(to_np(a) for a in (p.codes, p.norms, p.qjl, p.rnorms)))


def norm_close(got, want, nd, p, slack=None):
    """Norms that agree to a relative tol(p) before rounding to ``nd`` (within one ulp after),
    plus an absolute ``slack`` per row where FORMAT.md section 5 allows one."""
    got, want = got.astype(np.float64), want.astype(np.float64)
    fin = np.isfinite(want)
    if not np.array_equal(fin, np.isfinite(got)):
        return False
    spacing = np.spacing(np.abs(want[fin]).astype(nd)).astype(np.float64)
    extra = 0.0 if slack is None else np.asarray(slack, np.float64)[fin]
    return bool(np.all(np.abs(got[fin] - want[fin]) <= tol(p) * np.abs(want[fin]) + extra + spacing))


def check_encoding(plan, x_ref, got: Parts, dense_exact: bool, qjl_exact: bool | None = None):
    """Assert that ``got`` encodes ``x_ref`` as FORMAT.md section 5 allows.

    dense_exact: the backend follows the sequential dense order (NumPy, Numba,
    CuPy's exact kernels), so every configuration must be bit-identical.  Otherwise
    (torch's matmul) hadamard codes/norms/residual norms are exact and the dense
    parts are checked against the tolerance.  qjl_exact=False (default: dense_exact)
    with dense_exact=True: everything bit-identical except the QJL signs, which are
    checked against the tolerance (CuPy's tensor-core projection).
    """
    cfg = plan.config
    want = ref.encode(plan, x_ref)
    got = np_parts(got)
    names = ("codes", "norms", "qjl", "rnorms")
    qjl_exact = dense_exact if qjl_exact is None else qjl_exact
    for nm in names:
        assert getattr(got, nm).shape == getattr(want, nm).shape, nm
        assert getattr(got, nm).dtype == getattr(want, nm).dtype, nm
    if dense_exact:
        for nm in names:
            if nm != "qjl" or qjl_exact:
                assert getattr(got, nm).tobytes() == getattr(want, nm).tobytes(), nm
        if not qjl_exact and cfg.kind == "prod":
            _check_qjl_signs(plan, x_ref, want, got, np.ones(x_ref.shape[0], bool))
        return
    haar = plan.signs is None
    p, b, n = plan.padded_dim, cfg.mse_bits, x_ref.shape[0]
    with np.errstate(all="ignore"):
        xs, e, rho, u = ref.unit_rows(plan, x_ref)
    u = u.astype(np.float64)
    rows_same = np.ones(n, bool)
    if b > 0:
        cw, cg = unpack_bits(want.codes, p, b).astype(int), unpack_bits(got.codes, p, b).astype(int)
        diff = cw != cg
        if diff.any():
            assert haar, "hadamard codes must be bit-identical"
            tau = tol(p) * (np.abs(plan.matrix.astype(np.float64)) @ np.abs(xs.astype(np.float64)).T).T
            tau /= np.where(rho > 0, rho, 1)[:, None]
            t = plan.boundaries.astype(np.float64)
            for i, j in zip(*np.nonzero(diff)):
                lo, hi = sorted((cw[i, j], cg[i, j]))
                assert np.all(np.abs(u[i, j] - t[lo:hi]) <= tau[i, j]), (i, j, u[i, j], t[lo:hi], tau[i, j])
            rows_same = ~diff.any(axis=1)
        if haar:
            keep = rows_same if cfg.norm_correction else np.ones(n, bool)
            assert norm_close(got.norms[keep], want.norms[keep], plan.norm_dtype, p)
        else:
            assert got.codes.tobytes() == want.codes.tobytes()
            assert got.norms.tobytes() == want.norms.tobytes()
    if cfg.kind == "prod":
        if haar:
            # r = u - c: the rotation's rounding moves u_j by up to tau_j, so |r| moves by up to
            # |tau|, which is not small relative to a tiny residual (FORMAT.md section 5)
            slack = tol(p) * np.ldexp(np.linalg.norm(np.abs(plan.matrix.astype(np.float64))
                                                     @ np.abs(xs.astype(np.float64)).T, axis=0), e)
            assert norm_close(got.rnorms[rows_same], want.rnorms[rows_same], plan.norm_dtype, p,
                              slack[rows_same])
        else:
            assert got.rnorms.tobytes() == want.rnorms.tobytes()
        _check_qjl_signs(plan, x_ref, want, got, rows_same)


def _check_qjl_signs(plan, x_ref, want, got, rows_same):
    """QJL signs of rows whose codes agree differ from the reference's only where the exact
    projection of the reference's residual lies within tol(p) |S| |r| of zero."""
    p = plan.padded_dim
    with np.errstate(all="ignore"):
        proj, bound = ref.qjl_sign_margin(plan, x_ref)
    qw, qg = unpack_bits(want.qjl, p, 1), unpack_bits(got.qjl, p, 1)
    bad = (qw != qg) & rows_same[:, None] & ~(np.abs(proj) <= bound)
    assert not bad.any(), np.argwhere(bad)[:5]


def check_decode_scores(cfg, x_ref, be_name, to_backend, rng, device=None):
    """Decode and score the reference's bytes on a backend: float32 tolerance."""
    qn = tq.Quantizer.from_config(cfg, backend="numpy")
    qb = tq.Quantizer.from_config(cfg, backend=be_name)
    with np.errstate(all="ignore"):
        cn = qn.compress(x_ref)
    cb = cn.to(be_name, device=device)
    dn, db = qn.decompress(cn), to_np(qb.decompress(cb))
    assert db.dtype == np.float32 and db.shape == dn.shape
    scale = np.linalg.norm(dn.astype(np.float64), axis=-1, keepdims=True)
    assert np.all(np.abs(db - dn) <= 1e-5 * scale + 1e-30)
    y = rng.standard_normal((5, cfg.dim)).astype(np.float32)
    sn, sb = qn.inner_product(y, cn), to_np(qb.inner_product(to_backend(y), cb))
    p = np_parts(cn.parts)
    nu = p.norms.astype(np.float64) if p.norms.size else 0
    gam = p.rnorms.astype(np.float64) if p.rnorms.size else 0
    tol = 1e-5 * np.linalg.norm(y, axis=1, keepdims=True) * (nu + gam) + 1e-30
    assert sb.shape == sn.shape and np.all(np.abs(sb - sn) <= tol)


@st.composite
def cases(draw, rotation=None):
    dim, bits = draw(DIMS), draw(st.integers(1, 8))
    cfg = tq.QuantizerConfig(dim, bits, kind=draw(st.sampled_from(["mse", "prod"])),
                             rotation=rotation or draw(st.sampled_from(["hadamard", "haar"])),
                             seed=draw(st.integers(0, 2**63 - 1)),
                             norm_dtype=draw(st.sampled_from(["float16", "float32"])),
                             norm_correction=draw(st.booleans()))
    n = draw(st.sampled_from([1, 2, 7, 33, 70]))
    return cfg, n, draw(st.sampled_from(SCALES)), draw(st.sampled_from(["float16", "bfloat16", "float32", "float64"])), \
        draw(st.integers(0, 2**32 - 1))


# ----------------------------------------------------------------- tests
def backend():
    return tq.get_backend("torch")


@settings(max_examples=120, **SETTINGS)
@given(cases(rotation="hadamard"))
def test_hadamard_bit_identical(case):
    cfg, n, scale, dtype, s = case
    rng = np.random.default_rng(s)
    xt, xr = as_dtype(make_input(rng, n, cfg.dim, scale, dtype), dtype)
    plan = cfg.plan()
    with np.errstate(all="ignore"):
        got = backend().encode(plan, xt)
        if cfg.kind == "mse":  # no dense product at all: every byte
            want = ref.encode(plan, xr)
            assert b"".join(a.tobytes() for a in np_parts(got).__dict__.values()) == \
                b"".join(a.tobytes() for a in want.__dict__.values())
        check_encoding(plan, xr, got, dense_exact=False)


@settings(max_examples=50, **SETTINGS)
@given(cases(rotation="haar"))
def test_haar_within_format_tolerance(case):
    cfg, n, scale, dtype, s = case
    rng = np.random.default_rng(s)
    xt, xr = as_dtype(make_input(rng, n, cfg.dim, scale, dtype), dtype)
    with np.errstate(all="ignore"):
        check_encoding(cfg.plan(), xr, backend().encode(cfg.plan(), xt), dense_exact=False)


@settings(max_examples=40, **SETTINGS)
@given(cases())
def test_decode_and_inner_products_float_tolerance(case):
    cfg, n, scale, dtype, s = case
    rng = np.random.default_rng(s)
    x = make_input(rng, n, cfg.dim, "mixed" if scale in ("huge", "subnormal") else scale, "float32").astype(np.float32)
    if cfg.norm_dtype == "float16":
        x = np.clip(x, -1e3, 1e3) / max(1.0, np.sqrt(cfg.dim))
    check_decode_scores(cfg, x, "torch", torch.from_numpy, rng)


def test_api_stays_in_torch(rng):
    q = tq.Quantizer(100, 3, kind="prod", backend="torch")
    x = torch.from_numpy(rng.standard_normal((2, 3, 100)).astype(np.float32)).to(torch.bfloat16)
    c = q.compress(x)
    assert c.backend == "torch" and c.shape == (2, 3)
    assert all(isinstance(a, torch.Tensor) for a in (c.parts.codes, c.parts.norms, c.parts.qjl, c.parts.rnorms))
    out = q.decompress(c)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 100) and out.dtype == torch.float32
    s = q.inner_product(torch.ones(100), c)
    assert isinstance(s, torch.Tensor) and s.shape == (6,)
    assert tq.compress(x, bits=3, kind="prod").backend == "torch"  # auto backend follows the array type


def test_zero_rows_and_errors(rng):
    q = tq.Quantizer(64, 3, backend="torch")
    x = torch.from_numpy(rng.standard_normal((4, 64)).astype(np.float32))
    x[0] = 0
    assert torch.all(q.decompress(q.compress(x))[0] == 0)
    x[1] *= 1e6
    with pytest.raises(ValueError, match="norm_dtype"):
        q.compress(x)
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        q.compress(x)
    with pytest.raises(TypeError):
        q.compress(torch.zeros((2, 64), dtype=torch.int32))


@pytest.mark.parametrize("b", [2])
def test_prod_unbiased_on_torch(rng, b):
    """Average over QJL matrices (seeds) and queries: slope of estimate vs truth within 0.01 of 1."""
    d = 128
    est, true = [], []
    for seed in range(40):
        x = rng.standard_normal((300, d))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        y = rng.standard_normal((30, d)).astype(np.float32)
        q = tq.Quantizer(d, b, kind="prod", seed=seed, norm_dtype="float32", backend="torch")
        est.append(q.inner_product(torch.from_numpy(y), q.compress(torch.from_numpy(x))).numpy().ravel())
        true.append((y @ x.T).ravel())
    est, true = np.concatenate(est), np.concatenate(true)
    assert abs(np.polyfit(true, est, 1)[0] - 1) < 0.01
    err = est - true
    assert abs(err.mean()) < 3 * err.std() / np.sqrt(err.size)


def test_float64_sqrt_rounds_correctly():
    """torch_backend.sqrt_rn is correctly rounded (exhaustive over two binades and the subnormals' start)."""
    from tq.backends.torch_backend import sqrt_rn

    for start in (0x00000001, 0x3F000000):
        bits = np.arange(start, start + (1 << 24), dtype=np.uint32)
        f = bits.view(np.float32)
        assert np.array_equal(sqrt_rn(torch.from_numpy(f)).numpy(), np.sqrt(f))


def test_torch_is_imported_lazily_and_optional():
    code = ("import sys, tq; assert 'torch' not in sys.modules; "
            "sys.modules['torch'] = None; import tq.backends.torch_backend as t; "
            "assert not t.TorchBackend.is_available(); assert 'torch' not in tq.available_backends(); "
            "import pytest\n"
            "try:\n    tq.get_backend('torch')\nexcept RuntimeError as e:\n    assert 'pip install' in str(e)\n"
            "else:\n    raise SystemExit('no error')")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------- compiled encode core
@pytest.mark.parametrize("dim,bits,kind,nc,dtype", [(128, 3, "mse", False, "float16"), (100, 4, "prod", True, "float32"),
                                                   (96, 1, "prod", False, "bfloat16")])
def test_compiled_encode_matches_eager(dim, bits, kind, nc, dtype):
    """tb.encode_fused (torch.compile, strict numerics) writes the eager path's bytes,
    zero, tiny and huge rows included, for a short input (one padded bucket)."""
    from tq.backends import torch_backend as tb

    plan = tq.QuantizerConfig(dim, bits, kind=kind, seed=11, norm_correction=nc).plan()
    rng = np.random.default_rng(dim)
    x64 = np.concatenate([make_input(rng, 200, dim, s, dtype) for s in ("unit", "mixed", "zeros", "huge")])
    xt, _ = as_dtype(x64, dtype)
    want, got = tq.get_backend("torch").encode(plan, xt), tb.encode_fused(plan, xt)
    for nm in ("codes", "norms", "qjl", "rnorms"):
        assert torch.equal(getattr(got, nm), getattr(want, nm)), nm


@pytest.mark.parametrize("rotation", ["hadamard", "haar"])
def test_torch_compiled_backend_writes_torch_bytes(rotation):
    """backend="torch-compiled" is the torch backend with a compiled encode: same container,
    same bytes, eager fallback for the dense rotation, and the same decoded values."""
    x = torch.from_numpy(make_input(np.random.default_rng(4), 700, 80, "mixed", "float32").astype(np.float32))
    kw = dict(bits=3, kind="prod", rotation=rotation, norm_dtype="float32")
    want, got = tq.compress(x, backend="torch", **kw), tq.compress(x, backend="torch-compiled", **kw)
    assert got.tobytes() == want.tobytes()
    assert torch.equal(tq.decompress(got), tq.decompress(want))


@pytest.mark.parametrize("dim,bits,kind", [(128, 2, "mse"), (100, 8, "mse"), (96, 1, "prod"), (64, 3, "prod")])
def test_compiled_decode_matches_eager(dim, bits, kind):
    """tb.decode_fused (torch.compile, strict numerics) returns the eager decode's values
    exactly, for zero and huge rows too, and for 0 MSE bits (prod at 1 bit)."""
    from tq.backends import torch_backend as tb

    plan = tq.QuantizerConfig(dim, bits, kind=kind, seed=12, norm_dtype="float32").plan()
    rng = np.random.default_rng(bits)
    x = torch.from_numpy(np.concatenate([make_input(rng, 150, dim, s, "float32") for s in ("unit", "zeros", "huge")]))
    parts = tb.encode(plan, x.to(torch.float32))
    want, got = tb.decode(plan, parts), tb.decode_fused(plan, parts)
    assert got.dtype == torch.float32 and got.shape == (450, dim)
    assert torch.equal(got, want)
