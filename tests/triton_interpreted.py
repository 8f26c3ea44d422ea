"""Property tests of the torch-triton kernels under Triton's interpreter (``TRITON_INTERPRET=1``).

Not collected by the normal run (no ``test_`` prefix): tests/test_triton_backend.py runs this
file in a subprocess with the variable set, because Triton reads it when the kernels are
defined.  The interpreter executes the kernels' source with NumPy on the CPU, one IEEE float32
operation at a time, so the encode kernels (plain Triton, and Gluon through
tq/backends/_gluon_interp.py) must give the reference's bytes, and the decode and scores
kernels its values within float32 tolerance.  What the interpreter cannot show: the compiled
code's rounding (fma contraction, flushed subnormals, TF32 products), which
tests/test_gpu_backends.py checks on a GPU.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through tests/test_triton_backend.py (needs TRITON_INTERPRET=1)", allow_module_level=True)
torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import tq  # noqa: E402
from tq.backends import triton_backend as trb  # noqa: E402
from tq.backends.base import Parts  # noqa: E402
from test_torch_backend import SCALES, as_dtype, check_decode_scores, check_encoding, make_input  # noqa: E402

SETTINGS = dict(deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# padded dims 16..256: powers of two and dims that pad (20 -> 32, 96/100 -> 128, 129 -> 256)
DIMS = st.sampled_from([16, 20, 33, 64, 96, 100, 128, 129, 256])


@st.composite
def encode_cases(draw, kinds=("mse", "prod"), max_bits=trb.MAX_BITS, dims=DIMS):
    kind = draw(st.sampled_from(kinds))
    cfg = tq.QuantizerConfig(draw(dims), draw(st.integers(1, max_bits)), kind=kind,
                             seed=draw(st.integers(0, 2**32 - 1)), norm_correction=draw(st.booleans()),
                             norm_dtype=draw(st.sampled_from(["float16", "float32"])))
    return (cfg, draw(st.sampled_from([1, 7, 45])), draw(st.sampled_from(SCALES)),
            draw(st.sampled_from(["float16", "bfloat16", "float32"])), draw(st.integers(0, 2**32 - 1)))


def _encode_check(case, gluon):
    cfg, n, scale, dtype, seed = case
    plan = cfg.plan()
    xt, xr = as_dtype(make_input(np.random.default_rng(seed), n, cfg.dim, scale, dtype), dtype)
    assert trb.applies(plan, xt)
    with np.errstate(all="ignore"):
        got = trb.encode(plan, xt, gluon=gluon)
    # np.matmul orders the QJL projection's sums its own way: FORMAT.md section 5's tolerance
    check_encoding(plan, xr, got, dense_exact=False)


@settings(max_examples=40, **SETTINGS)
@given(case=encode_cases())
def test_plain_encode_kernel(case):
    _encode_check(case, gluon=False)


@settings(max_examples=40, **SETTINGS)
@given(case=encode_cases().filter(lambda c: trb.gluon_applies(c[0].plan(), torch.zeros(1))))
def test_gluon_encode_kernel(case):
    _encode_check(case, gluon=True)


@settings(max_examples=40, **SETTINGS)
@given(case=encode_cases(max_bits=8, dims=st.sampled_from([16, 20, 33, 64, 96, 100, 128])))
def test_decode_and_scores_kernels(case):
    cfg, n, scale, _, seed = case
    rng = np.random.default_rng(seed)
    x = make_input(rng, n, cfg.dim, "mixed" if scale in ("huge", "subnormal") else scale, "float32")
    if cfg.norm_dtype == "float16":
        x = np.clip(x, -1e3, 1e3) / np.sqrt(cfg.dim)
    plan = cfg.plan()
    parts = Parts(*(torch.zeros((1, 1), dtype=torch.uint8) for _ in range(4)))
    assert trb.decode_applies(plan, parts)
    check_decode_scores(cfg, x.astype(np.float32), "torch-triton", torch.from_numpy, rng)
    if trb.gluon_scores_applies(plan, parts):  # and the tensor-core scores kernel on the same rows
        saved, trb.gluon_scores_applies = trb.gluon_scores_applies, lambda *a: False
        try:
            check_decode_scores(cfg, x.astype(np.float32), "torch-triton", torch.from_numpy, rng)
        finally:
            trb.gluon_scores_applies = saved


@settings(max_examples=30, **SETTINGS)
@given(case=encode_cases(kinds=("mse",), max_bits=8, dims=st.sampled_from([16, 20, 33, 64, 96, 100, 128])))
def test_gluon_decode_is_the_reference(case):
    """The one-row-per-thread decode does the reference's operations in its order: equal floats.
    The tensor-core decode_kernel keeps being checked on the same rows (within tolerance)."""
    cfg, n, scale, _, seed = case
    plan = cfg.plan()
    x = make_input(np.random.default_rng(seed), n, cfg.dim, "mixed" if scale in ("huge", "subnormal") else scale,
                   "float32")
    if cfg.norm_dtype == "float16":
        x = np.clip(x, -1e3, 1e3) / np.sqrt(cfg.dim)
    ref = tq.get_backend("numpy")
    parts = ref.encode(plan, x)
    want = ref.decode(plan, parts)
    tparts = Parts(*(torch.from_numpy(np.ascontiguousarray(a)) for a in
                     (parts.codes, parts.norms, parts.qjl, parts.rnorms)))
    assert trb.gluon_decode_applies(plan, tparts)
    with np.errstate(all="ignore"):
        got = trb.decode(plan, tparts).numpy()
        plain = trb.decode(plan, tparts, gluon=False).numpy()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(plain, want, rtol=0, atol=1e-5 * max(np.abs(want).max(), 1e-30))


def test_scores_with_more_queries_than_a_program_takes():
    """Queries beyond SCORE_QUERIES go to a second grid axis; rows beyond SCORE_ROWS to more programs."""
    cfg = tq.QuantizerConfig(128, 3, kind="prod", seed=5)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((trb.SCORE_ROWS + 3, 128)).astype(np.float32)
    q = rng.standard_normal((trb.SCORE_QUERIES * 2 + 1, 128)).astype(np.float32)
    qn, qt = tq.Quantizer.from_config(cfg, backend="numpy"), tq.Quantizer.from_config(cfg, backend="torch-triton")
    c = qn.compress(x)
    want = qn.inner_product(q, c)
    got = qt.inner_product(torch.from_numpy(q), c.to("torch-triton")).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
