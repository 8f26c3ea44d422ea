"""GPU backends against the NumPy reference (docs/FORMAT.md section 5).

* ``torch`` on CUDA tensors: hadamard bytes identical (QJL signs within the
  matmul tolerance), haar within the tolerance, decode/scores to float32
  tolerance, prod unbiased.  Marked ``gpu``; skipped without a CUDA GPU.
* ``cupy`` (CUDA C kernels, sequential dense products): every configuration
  bit-identical, with CuPy arrays and with CUDA torch tensors as input (which
  must come back as torch tensors).  Marked ``gpu``; skipped without CuPy and
  a GPU.
* The same CuPy backend code with its kernels compiled as host C++
  (tq/kernels/quant_hostemu.cuh) behind a stand-in for the few CuPy calls it
  makes: checks the kernels' logic, launch geometry and the backend's
  argument marshalling on any machine with g++ (no GPU).

Run the GPU part with ``pytest -m gpu tests/test_gpu_backends.py``.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import tq
from tq.backends import base as backend_base

from test_torch_backend import as_dtype, check_decode_scores, check_encoding, make_input, np_parts, to_np

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                        HealthCheck.function_scoped_fixture])
KDIR = Path(tq.__file__).resolve().parent / "kernels"

# (dim, bits, kind): few distinct fast-kernel instantiations (each compiles once),
# plus dimensions that take the generic kernels (P < 8, P > 256, Haar off powers of two).
GPU_CASES = [(128, 3, "mse"), (128, 3, "prod"), (96, 3, "prod"), (128, 2, "mse"), (100, 4, "mse"),
             (256, 4, "mse"), (200, 2, "prod"), (5, 1, "prod"), (64, 4, "mse"), (2, 3, "mse"), (300, 2, "prod")]


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _real_cupy():
    if "cupy" in sys.modules and getattr(sys.modules["cupy"], "_TQ_FAKE", False):
        return None
    try:
        import cupy
        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:
        return None


@st.composite
def gpu_cases(draw):
    dim, bits, kind = draw(st.sampled_from(GPU_CASES))
    rotation = draw(st.sampled_from(["hadamard", "haar"]))
    cfg = tq.QuantizerConfig(dim, bits, kind=kind, rotation=rotation, seed=draw(st.integers(0, 2**63 - 1)),
                             norm_dtype=draw(st.sampled_from(["float16", "float32"])),
                             norm_correction=draw(st.booleans()))
    n = draw(st.sampled_from([1, 3, 127, 128, 129, 300]))
    return cfg, n, draw(st.sampled_from(["unit", "tiny", "huge", "subnormal", "mixed", "zeros", "one_hot"])), \
        draw(st.sampled_from(["float16", "bfloat16", "float32", "float64"])), draw(st.integers(0, 2**32 - 1))


class Target:
    """How a test hands arrays to one backend flavour."""

    def __init__(self, name, backend, exact, put, q_put):
        self.name, self.backend, self.exact, self.put, self.q_put = name, backend, exact, put, q_put


def _targets():
    torch, cp = _torch_cuda(), _real_cupy()
    out = {}
    if torch is not None:
        out["torch-cuda"] = Target("torch-cuda", "torch", False, lambda t: t.cuda(),
                                   lambda a: torch.from_numpy(a).cuda())
        if "torch-triton" in tq.available_backends():
            out["torch-triton"] = Target("torch-triton", "torch-triton", False, lambda t: t.cuda(),
                                         lambda a: torch.from_numpy(a).cuda())
    if cp is not None:
        def put_cupy(t):
            if str(t.dtype) == "torch.bfloat16":  # CuPy has no bfloat16: hand it the torch tensor
                return t.cuda()
            return cp.asarray(t.numpy())

        out["cupy"] = Target("cupy", "cupy", True, put_cupy, cp.asarray)
        if torch is not None:
            out["cupy-torch"] = Target("cupy-torch", "cupy", True, lambda t: t.cuda(),
                                       lambda a: torch.from_numpy(a).cuda())
    return out


TARGET_NAMES = ["torch-cuda", "torch-triton", "cupy", "cupy-torch"]


@pytest.fixture(params=TARGET_NAMES)
def target(request):
    t = _targets().get(request.param)
    if t is None:
        pytest.skip(f"{request.param}: needs a CUDA GPU (and CuPy / torch)")
    return t


# ----------------------------------------------------------------- GPU tests
@pytest.mark.gpu
@settings(max_examples=30, **SETTINGS)
@given(case=gpu_cases())
def test_encode_against_reference(target, case):
    cfg, n, scale, dtype, s = case
    rng = np.random.default_rng(s)
    xt, xr = as_dtype(make_input(rng, n, cfg.dim, scale, dtype), dtype)
    plan = cfg.plan()
    be = tq.get_backend(target.backend)
    with np.errstate(all="ignore"):
        got = be.encode(plan, target.put(xt))
        if target.name == "cupy-torch" or target.backend.startswith("torch"):
            assert type(got.codes).__module__.startswith("torch")
        check_encoding(plan, xr, got, dense_exact=target.exact, qjl_exact=_cupy_qjl_exact(target, plan))


def _cupy_qjl_exact(target, plan):
    """Whether a target's QJL signs must equal the reference's bytes (CuPy without the
    tensor-core projection) rather than meet the rounding bound."""
    if target.backend != "cupy":
        return None
    from tq.backends import cupy_backend
    return not cupy_backend.qjl_mma_ok(plan)


FUSED_CASES = [(128, 3, "mse", False), (128, 4, "prod", False), (100, 2, "mse", True), (64, 1, "prod", True)]


# the Gluon kernel (P <= 128, mse bits <= 4) and the plain Triton one (padded norm correction, P = 256)
TRITON_CASES = FUSED_CASES + [(128, 2, "mse", False), (128, 4, "mse", True), (96, 3, "mse", False),
                              (256, 3, "prod", False), (16, 1, "mse", False)]


def _fused_encoder(name):
    """(encode function, the settings it is tested on) of a fused GPU encode path."""
    if name == "torch-compiled":
        from tq.backends import torch_backend as tb
        return tb.encode_fused, FUSED_CASES
    pytest.importorskip("triton")
    from tq.backends import triton_backend as trb

    def encode(plan, x):
        assert trb.applies(plan, x), "the eager fallback would run, not a Triton kernel"
        return trb.encode(plan, x)

    return encode, TRITON_CASES


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["torch-compiled", "torch-triton"])
@settings(max_examples=30, **SETTINGS)
@given(pick=st.integers(0, 10**6), n=st.sampled_from([1, 129, 1500]),
       scale=st.sampled_from(["unit", "tiny", "huge", "subnormal", "mixed", "zeros", "one_hot"]),
       dtype=st.sampled_from(["float16", "bfloat16", "float32"]), seed=st.integers(0, 2**32 - 1))
def test_fused_torch_encode_on_cuda(path, pick, n, scale, dtype, seed):
    """The fused encodes on CUDA (torch.compile'd core; torch-triton's Gluon and plain Triton
    kernels) against the reference: hadamard codes and norms bit-identical, QJL signs within
    FORMAT.md section 5."""
    if _torch_cuda() is None:
        pytest.skip("needs a CUDA GPU and torch")
    encode, cases = _fused_encoder(path)
    dim, bits, kind, nc = cases[pick % len(cases)]
    plan = tq.QuantizerConfig(dim, bits, kind=kind, seed=3, norm_correction=nc).plan()
    xt, xr = as_dtype(make_input(np.random.default_rng(seed), n, dim, scale, dtype), dtype)
    with np.errstate(all="ignore"):
        check_encoding(plan, xr, encode(plan, xt.cuda()), dense_exact=False)


@pytest.mark.gpu
@settings(max_examples=8, **SETTINGS)
@given(setting=st.sampled_from(FUSED_CASES), n=st.sampled_from([1, 129, 1500]),
       scale=st.sampled_from(["unit", "tiny", "huge", "zeros", "mixed"]), seed=st.integers(0, 2**32 - 1))
def test_compiled_torch_decode_on_cuda(setting, n, scale, seed):
    """backend="torch-compiled" on CUDA (compiled hadamard decode) decodes and scores the
    reference's bytes within check_decode_scores' float32 tolerance."""
    torch = _torch_cuda()
    if torch is None:
        pytest.skip("needs a CUDA GPU and torch")
    dim, bits, kind, nc = setting
    cfg = tq.QuantizerConfig(dim, bits, kind=kind, seed=3, norm_correction=nc, norm_dtype="float32")
    rng = np.random.default_rng(seed)
    x = make_input(rng, n, dim, scale, "float32").astype(np.float32)
    check_decode_scores(cfg, x, "torch-compiled", lambda a: torch.from_numpy(a).cuda(), rng, device="cuda")


@pytest.mark.gpu
@settings(max_examples=12, **SETTINGS)
@given(case=gpu_cases())
def test_decode_and_scores_against_reference(target, case):
    cfg, n, scale, _, s = case
    rng = np.random.default_rng(s)
    x = make_input(rng, n, cfg.dim, "mixed" if scale in ("huge", "subnormal") else scale, "float32").astype(np.float32)
    if cfg.norm_dtype == "float16":
        x = np.clip(x, -1e3, 1e3) / max(1.0, np.sqrt(cfg.dim))
    device = "cuda" if target.name != "cupy" else None
    check_decode_scores(cfg, x, target.backend, target.q_put, rng, device=device)


@pytest.mark.gpu
@pytest.mark.parametrize("rotation", ["hadamard", "haar"])
def test_prod_unbiased(target, rotation):
    rng = np.random.default_rng(7)
    d, est, true = 128, [], []
    for seed in range(20):
        x = rng.standard_normal((300, d))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        y = rng.standard_normal((30, d)).astype(np.float32)
        q = tq.Quantizer(d, 3, kind="prod", rotation=rotation, seed=seed, norm_dtype="float32",
                         backend=target.backend)
        c = q.compress(target.q_put(x))
        est.append(to_np(q.inner_product(target.q_put(y), c)).ravel())
        true.append((y @ x.T).ravel())
    est, true = np.concatenate(est), np.concatenate(true)
    assert abs(np.polyfit(true, est, 1)[0] - 1) < 0.01


@pytest.mark.gpu
def test_cupy_torch_in_torch_out():
    torch, cp = _torch_cuda(), _real_cupy()
    if torch is None or cp is None:
        pytest.skip("needs CuPy, torch and a CUDA GPU")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 50, 128)).astype(np.float32)
    q = tq.Quantizer(128, 3, kind="prod", backend="cupy")
    c = q.compress(torch.from_numpy(x).cuda().to(torch.bfloat16))
    for a in (c.parts.codes, c.parts.norms, c.parts.qjl, c.parts.rnorms):
        assert isinstance(a, torch.Tensor) and a.is_cuda
    assert c.tobytes() == tq.Quantizer(128, 3, kind="prod").compress(
        torch.from_numpy(x).to(torch.bfloat16).float().numpy()).tobytes()
    out = q.decompress(c)
    assert isinstance(out, torch.Tensor) and out.is_cuda and out.shape == (2, 50, 128)
    s = q.inner_product(torch.ones(128, device="cuda"), c)
    assert isinstance(s, torch.Tensor) and s.shape == (100,)
    cc = q.compress(cp.asarray(x))
    assert isinstance(cc.parts.codes, cp.ndarray)
    assert isinstance(q.decompress(cc), cp.ndarray)


@pytest.mark.gpu
def test_cupy_rejects_host_arrays():
    cp = _real_cupy()
    if cp is None:
        pytest.skip("needs CuPy and a CUDA GPU")
    q = tq.Quantizer(64, 3, backend="cupy")
    with pytest.raises(TypeError, match="cupy"):
        q.compress(np.zeros((3, 64), np.float32))
    torch = _torch_cuda()
    if torch is not None:
        with pytest.raises(TypeError, match="CPU"):
            q.compress(torch.zeros((3, 64)))


# ----------------------------------------------------------------- host emulation (no GPU)
_SIGS = {
    "enc": ("const char* x, long long n, int d, long long ldx, int dt, int flags, int vec, const float* signs, "
            "const float* rmat, const float* qmat, const float* cent, const float* bnd, unsigned char* codes, "
            "void* norms, unsigned char* qjl, void* rnorms"),
    "dec": ("const unsigned char* codes, const void* norms, const unsigned char* qjl, const void* rnorms, "
            "long long n, int d, int flags, const float* signs, const float* rmat, const float* qmat, "
            "const float* cent, float qscale, float* out"),
    "sc": ("const unsigned char* codes, const void* norms, const unsigned char* qjl, const void* rnorms, "
           "long long n, int flags, const float* qr, const float* sq, int m, const float* cent, float qscale, "
           "float* out"),
    "scm": ("const unsigned char* codes, const void* norms, const unsigned char* qjl, const void* rnorms, "
            "long long n, int flags, const float* qr, const float* sq, int m, const uint4* tables, float cinv, "
            "float qscale, float* out"),
    "tqq_encode_generic": ("const char* x, long long n, int d, long long ldx, int dt, int flags, int P, int W, "
                           "int B, const float* signs, const float* rmat, const float* qmat, const float* cent, "
                           "const float* bnd, unsigned char* codes, void* norms, unsigned char* qjl, void* rnorms, "
                           "int cb, int qb, char* gs, long long stride"),
    "tqq_decode_generic": ("const unsigned char* codes, const void* norms, const unsigned char* qjl, "
                           "const void* rnorms, long long n, int d, int flags, int P, int W, int B, int cb, "
                           "int qb, const float* signs, const float* rmat, const float* qmat, const float* cent, "
                           "float qscale, float* out, char* gs, long long stride"),
    "tqq_scores_generic": ("const unsigned char* codes, const void* norms, const unsigned char* qjl, "
                           "const void* rnorms, long long n, int flags, int P, int W, int B, int cb, int qb, "
                           "const float* qr, const float* sq, int m, const float* cent, float qscale, float* out, "
                           "char* gs, long long stride"),
    "tqq_rotate_generic": ("const float* q, long long m, int d, int P, int W, int flags, const float* signs, "
                           "const float* rmat, float* out, char* gs, long long stride"),
}
_FAST_KERNEL = {"encode": "enc", "decode": "dec", "scores": "sc", "scores_mma": "scm"}
_MMA_P, _MMA_BITS = (32, 64, 128, 256), 4  # tqq_scores_mma's instantiations (cupy_backend.MMA_P)


def _call_list(sig):
    return ", ".join(a.split()[-1].lstrip("*") for a in sig.split(","))


def _emu_library(configs, build_dir: Path, defines=()):
    """Compile the kernels as host C++ with launchers for the given (P, B, prod) instantiations,
    with the -D options the backend compiles them with."""
    lines = ['#include "quant_hostemu.cuh"', '#include "quant_fast.cu"', '#include "quant_generic.cu"', 'extern "C" {']

    def launcher(name, sig, block, kernel):
        lines.append(f"void {name}(int grid, long long smem, {sig}) {{ tqq_emu_launch(grid, {block}, "
                     f"(size_t)smem, [=] {{ {kernel}({_call_list(sig)}); }}); }}")

    for p, b, prod in sorted(configs):
        for kind, short in _FAST_KERNEL.items():
            if short == "scm" and (p not in _MMA_P or b > _MMA_BITS):
                continue
            launcher(f"{short}_{p}_{b}_{int(prod)}", _SIGS[short], 128,
                     f"tqq_{kind}<{p}, {b}, {'true' if prod else 'false'}>")
    for name in ("tqq_encode_generic", "tqq_decode_generic", "tqq_scores_generic", "tqq_rotate_generic"):
        launcher("emu_" + name, _SIGS[name], 256, name)
    lines.append("}")
    src = "\n".join(lines) + "\n"
    defines = list(defines)
    key = hashlib.sha1((" ".join(defines) + src + "".join(f.read_text() for f in sorted(KDIR.glob("quant*")))).encode()).hexdigest()[:16]
    lib = build_dir / f"tqq_emu_{key}.so"
    if not lib.exists():
        cpp = build_dir / f"tqq_emu_{key}.cpp"
        cpp.write_text(src)
        subprocess.run(["g++", "-std=c++20", "-O1", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared",
                        "-pthread", "-w", *defines, f"-I{KDIR}", str(cpp), "-o", str(lib)], check=True,
                       capture_output=True)
    return ctypes.CDLL(str(lib))


def _fake_cupy(build_dir: Path):
    """A module standing in for the CuPy calls tq/backends/cupy_backend.py makes: arrays are
    NumPy arrays, RawModule kernels run the host-compiled kernels (a few blocks, grid-stride)."""
    cp = types.ModuleType("cupy")
    cp._TQ_FAKE = True
    libs = {}

    class _Ptr:
        def __init__(self, p):
            self.ptr = p

    class _Device:
        def __init__(self, i=0):
            self.id = i

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    class ndarray(np.ndarray):
        @property
        def data(self):
            return _Ptr(self.ctypes.data)

        @property
        def device(self):
            return _Device(0)

    def wrap(a):
        return np.asarray(a).view(ndarray)

    def poisoned(shape, dtype):
        dtype = np.dtype(dtype)
        return wrap(np.full(shape, 0xAB if dtype.kind in "ui" else np.nan, dtype=dtype))

    class Kernel:
        def __init__(self, name, defines):
            self.name, self.defines, self.max_dynamic_shared_size_bytes = name, defines, 48 * 1024

        def __call__(self, grid, block, args, shared_mem=0):
            assert shared_mem <= max(48 * 1024, self.max_dynamic_shared_size_bytes) and shared_mem <= 227 * 1024
            m = re.fullmatch(r"tqq_(encode|decode|scores|scores_mma)<(\d+), (\d+), (true|false)>", self.name)
            if m:
                cfg = (int(m.group(2)), int(m.group(3)), m.group(4) == "true")
                key = (cfg, self.defines)
                if key not in libs:
                    libs[key] = _emu_library([cfg], build_dir, self.defines)
                fn = getattr(libs[key], f"{_FAST_KERNEL[m.group(1)]}_{cfg[0]}_{cfg[1]}_{int(cfg[2])}")
                assert block == (128,)
            else:
                if "generic" not in libs:
                    libs["generic"] = _emu_library([], build_dir, self.defines)
                fn = getattr(libs["generic"], "emu_" + self.name)
                assert block == (256,)
            conv = {np.int64: ctypes.c_longlong, np.int32: ctypes.c_int, np.float32: ctypes.c_float}
            cargs = [ctypes.c_void_p(a.ctypes.data) if isinstance(a, np.ndarray) else conv[type(a)](a.item())
                     for a in args]
            fn(ctypes.c_int(min(grid[0], 3)), ctypes.c_longlong(shared_mem), *cargs)

    class RawModule:
        def __init__(self, code=None, options=(), name_expressions=None):
            assert isinstance(options, tuple) and "-fmad=false" in options and "#include" not in code
            self.defines = tuple(o for o in options if o.startswith("-D"))

        def get_function(self, name):
            return Kernel(name, self.defines)

    class _Runtime:
        getDeviceCount = staticmethod(lambda: 1)
        getDevice = staticmethod(lambda: 0)
        getDeviceProperties = staticmethod(lambda d: {"multiProcessorCount": 1})

    class ExternalStream(_Device):
        pass

    cp.ndarray = ndarray
    cp.asarray = lambda a, dtype=None: wrap(np.asarray(np.asarray(a), dtype=dtype))
    cp.empty = lambda shape, dtype=np.float32: poisoned(shape, dtype)
    cp.zeros = lambda shape, dtype=np.float32: wrap(np.zeros(shape, dtype))
    cp.ascontiguousarray = lambda a, dtype=None: wrap(np.ascontiguousarray(np.asarray(a), dtype=dtype))
    cp.array = lambda a, order="C", copy=True: wrap(np.array(np.asarray(a), order=order, copy=copy))
    cp.asnumpy = lambda a: np.array(np.asarray(a))
    cp.isfinite = lambda a: wrap(np.isfinite(np.asarray(a)))
    cp.from_dlpack = lambda t: wrap(np.from_dlpack(t))
    cp.RawModule = RawModule
    cp.cuda = types.SimpleNamespace(runtime=_Runtime, Device=_Device, ExternalStream=ExternalStream)
    return cp


@pytest.fixture(scope="module")
def emulated_cupy(tmp_path_factory):
    """Swap in the stand-in CuPy and a fresh tq.backends.cupy_backend; restore everything afterwards."""
    if shutil.which("g++") is None:
        pytest.skip("host emulation needs g++")
    build_dir = Path(__file__).resolve().parent.parent / ".cache" / "tq-emu"
    build_dir.mkdir(parents=True, exist_ok=True)
    probe = build_dir / "barrier_probe.cpp"
    probe.write_text("#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n")
    if subprocess.run(["g++", "-std=c++20", "-pthread", str(probe), "-o", str(build_dir / "barrier_probe")],
                      capture_output=True).returncode != 0:
        pytest.skip("host emulation needs a C++20 compiler with <barrier>")
    _emu_library([], build_dir)  # a compile error in the kernels fails here (never a skip)
    saved = {k: sys.modules.get(k) for k in ("cupy", "tq.backends.cupy_backend")}
    saved_reg = backend_base._REGISTRY.pop("cupy", None), backend_base._INSTANCES.pop("cupy", None)
    sys.modules["cupy"] = _fake_cupy(build_dir)
    sys.modules.pop("tq.backends.cupy_backend", None)
    mod = importlib.import_module("tq.backends.cupy_backend")
    yield mod, sys.modules["cupy"]
    backend_base._REGISTRY.pop("cupy", None)
    backend_base._INSTANCES.pop("cupy", None)
    for k, v in saved.items():
        if v is None:
            sys.modules.pop(k, None)
        else:
            sys.modules[k] = v
    if saved_reg[0] is not None:
        backend_base._REGISTRY["cupy"] = saved_reg[0]
    if saved_reg[1] is not None:
        backend_base._INSTANCES["cupy"] = saved_reg[1]


EMU_CASES = [  # (dim, bits, kind, rotation, norm_correction, norm_dtype, dtype, n)
    (128, 3, "mse", "hadamard", False, "float16", "float16", 300),
    (96, 4, "prod", "hadamard", True, "float32", "float32", 130),
    (128, 3, "prod", "haar", True, "float16", "bfloat16", 129),
    (200, 3, "mse", "hadamard", True, "float16", "float64", 70),
    (5, 1, "prod", "hadamard", False, "float16", "float32", 40),
    (50, 2, "mse", "hadamard", False, "float16", "float16", 70),  # P = 64, d % 4 != 0: unstaged stores
    (24, 1, "mse", "hadamard", False, "float32", "float32", 45),  # 1 bit, rows shorter than P
    (16, 6, "prod", "haar", True, "float32", "float16", 40),
    (37, 3, "prod", "haar", True, "float16", "float32", 5),    # generic: Haar off a power of two
    (300, 2, "mse", "hadamard", True, "float16", "float32", 4),  # generic: P = 512
    (3, 2, "prod", "hadamard", True, "float32", "float64", 6),   # generic: P = 4
]


@pytest.mark.parametrize("case", EMU_CASES, ids=lambda c: "-".join(map(str, c[:5])))
def test_cupy_kernels_in_host_emulation(emulated_cupy, case):
    _check_emulated_case(*emulated_cupy, case)


SPLIT_CASES = [  # (ENC_EMAX, DEC_EMAX, case): rows owned by several threads, as the TQ_CUPY_* knobs allow
    (32, 64, (128, 3, "mse", "hadamard", False, "float16", "float16", 70)),   # encode 4, decode 2 per row
    (64, 32, (96, 4, "prod", "hadamard", True, "float32", "float32", 40)),    # encode 2, decode 4 per row
    (32, 32, (256, 2, "mse", "hadamard", True, "float16", "bfloat16", 20)),  # 8 threads per row
]


@pytest.mark.parametrize("split", SPLIT_CASES, ids=lambda c: f"enc{c[0]}-dec{c[1]}-{c[2][0]}-{c[2][2]}")
def test_cupy_row_splits_in_host_emulation(emulated_cupy, split, monkeypatch):
    """The cross-lane butterfly, tree and max stages (any threads per row) give the same bytes."""
    mod, cp = emulated_cupy
    enc, dec, case = split
    monkeypatch.setattr(mod, "ENC_EMAX", enc)  # the kernels' -D options follow (kernel_defines)
    monkeypatch.setattr(mod, "DEC_EMAX", {"mse": dec, "prod": dec})
    monkeypatch.setattr(mod, "FAST_KERNELS", {})
    assert f"-DTQQ_ENC_EMAX={enc}" in mod.kernel_defines()
    _check_emulated_case(mod, cp, case)


def _check_emulated_case(mod, cp, case):
    d, bits, kind, rotation, nc, nd, dtype, n = case
    cfg = tq.QuantizerConfig(d, bits, kind=kind, rotation=rotation, seed=11, norm_dtype=nd, norm_correction=nc)
    rng = np.random.default_rng(d * 100 + bits)
    x64 = make_input(rng, n, d, "mixed", dtype)
    xt, xr = as_dtype(x64, dtype)
    if dtype == "bfloat16":
        xin = cp.from_dlpack(xt.view(__import__("torch").int16))
        xin_dtype = "bfloat16"
    else:
        xin, xin_dtype = cp.asarray(xr), None
    be = tq.get_backend("cupy")
    assert isinstance(be, mod.CupyBackend)
    plan = cfg.plan()
    if xin_dtype:  # the stand-in has no bfloat16 arrays: call the kernel path with the dtype code directly
        orig = mod._dtype_name
        mod._dtype_name = lambda x: "bfloat16"
        try:
            got = be.encode(plan, xin)
        finally:
            mod._dtype_name = orig
    else:
        got = be.encode(plan, xin)
    with np.errstate(all="ignore"):
        check_encoding(plan, xr, got, dense_exact=True, qjl_exact=not mod.qjl_mma_ok(plan))
    x = np.clip(make_input(rng, min(n, 40), d, "unit", "float32"), -50, 50).astype(np.float32)
    check_decode_scores(cfg, x, "cupy", cp.asarray, rng)
    with pytest.raises(TypeError, match="cupy"):
        be.asarray(np.zeros((2, d), np.float32))


QJL_EMU_CASES = [  # (dim, bits, norm_correction, rotation, ENC_EMAX, QJL_MG, n): the tensor-core QJL
    (128, 3, True, "hadamard", 128, 1, 300),   # P = 128: 16 n-tiles, partial last tile
    (128, 3, True, "hadamard", 128, 2, 300),   # two m-tiles per warp pass
    (64, 1, False, "hadamard", 128, 2, 130),   # QJL only (0 MSE bits), P = 64
    (256, 2, False, "haar", 128, 1, 70),       # P = 256: 8 sign words per row
    (32, 4, True, "hadamard", 128, 1, 40),     # P = 32: one sign word
    (128, 2, False, "hadamard", 32, 2, 50),    # 4 threads per row: 32-row tiles, two warps idle
]


@pytest.mark.parametrize("case", QJL_EMU_CASES, ids=lambda c: "-".join(map(str, c[:6])))
def test_tensor_core_qjl_in_host_emulation(emulated_cupy, case, monkeypatch):
    """TQ_CUPY_QJL=exact writes the reference's bytes; the default tensor-core projection
    writes the same codes, norms and residual norms, and QJL signs that differ only within
    FORMAT.md section 5's rounding bound of zero (check_encoding).  Decoding (whose QJL
    product also runs on tensor cores by default) meets float32 tolerance either way."""
    mod, cp = emulated_cupy
    d, bits, nc, rotation, emax, mg, n = case
    monkeypatch.setattr(mod, "ENC_EMAX", emax)
    monkeypatch.setattr(mod, "QJL_MG", mg)
    monkeypatch.setattr(mod, "DEC_EMAX", {"mse": 128, "prod": emax})
    cfg = tq.QuantizerConfig(d, bits, kind="prod", rotation=rotation, seed=3, norm_correction=nc)
    plan = cfg.plan()
    rng = np.random.default_rng(d + bits)
    x = make_input(rng, n, d, "mixed", "float32").astype(np.float32)
    x[2] = 0.0
    be = tq.get_backend("cupy")
    for impl in ("exact", "mma"):
        monkeypatch.setattr(mod, "QJL_IMPL", impl)
        monkeypatch.setattr(mod, "FAST_KERNELS", {})
        assert mod.qjl_mma_ok(plan) == (impl == "mma")
        assert f"-DTQQ_QJL_MMA={int(impl == 'mma')}" in mod.kernel_defines()
        assert f"-DTQQ_QJL_MG={mg}" in mod.kernel_defines()
        assert mod.qjl_mma_ok(plan, "decode") == (impl == "mma")
        with np.errstate(all="ignore"):
            check_encoding(plan, x, be.encode(plan, cp.asarray(x)), dense_exact=True, qjl_exact=impl == "exact")
        xu = make_input(rng, 40, d, "unit", "float32").astype(np.float32)
        check_decode_scores(cfg, xu, "cupy", cp.asarray, rng)  # the decoder's QJL product too


def test_qjl_mma_fragments():
    """The S fragments: hi + lo equals 2^e S to 2^-22, max |2^e S| in [256, 512), and entry
    [n, s, lane] holds S[8n + g][16s + 2t + (0, 1, 8, 9)] for lane 4g + t."""
    from tq.backends.cupy_backend import qjl_mma_fragments
    S = tq.QuantizerConfig(64, 2, kind="prod", seed=9).plan().qjl_matrix
    f, inv = qjl_mma_fragments(S)
    assert f.shape == (8, 4, 32, 4) and f.dtype == np.uint32
    half = lambda w, k: ((w >> (16 * k)) & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64)
    e = 9 - int(np.frexp(np.max(np.abs(S)))[1])
    assert inv == 2.0 ** -e
    rebuilt = np.zeros((64, 64))
    for n_ in range(8):
        for s_ in range(4):
            for lane in range(32):
                g, t = divmod(lane, 4)
                w = f[n_, s_, lane]
                for reg, off in ((0, 0), (1, 8)):
                    for k in range(2):
                        rebuilt[8 * n_ + g, 16 * s_ + 2 * t + off + k] = half(w[reg], k) + half(w[reg + 2], k)
    want = np.ldexp(S.astype(np.float64), e)
    assert 256 <= np.max(np.abs(want)) < 512
    assert np.all(np.abs(rebuilt - want) <= 2.0**-22 * np.abs(want) + 2.0**-25)


def scores_within_float_tolerance(cfg, x, y, got_fn):
    """got_fn(quantizer-free compressed, y) must match the NumPy reference's inner products
    to 1e-5 |y| (|x| + residual norm) per query and row (check_decode_scores' bound)."""
    qn = tq.Quantizer.from_config(cfg, backend="numpy")
    cn = qn.compress(x)
    want = qn.inner_product(y, cn)
    got = got_fn(cn, y)
    p = np_parts(cn.parts)
    nu = p.norms.astype(np.float64) if p.norms.size else 0
    gam = p.rnorms.astype(np.float64) if p.rnorms.size else 0
    tol = 1e-5 * np.linalg.norm(y.astype(np.float64), axis=1, keepdims=True) * (nu + gam) + 1e-30
    assert got.shape == want.shape
    assert np.all(np.abs(got.astype(np.float64) - want) <= tol), float(np.max(np.abs(got - want) / tol))


MMA_EMU_CASES = [  # (dim, bits, kind, rotation, n): tensor-core scores, each MSE width and padded dim
    (128, 4, "mse", "hadamard", 77),
    (64, 2, "prod", "hadamard", 48),     # 1 MSE bit + QJL; whole 16-row iterations (bulk stores)
    (33, 1, "prod", "hadamard", 9),      # QJL only (0 MSE bits), P = 64
    (32, 3, "mse", "haar", 40),          # P = 32
    (256, 4, "prod", "hadamard", 35),    # P = 256, 3 MSE bits
    (100, 2, "mse", "hadamard", 68),     # two whole 32-row iterations (bulk stores) and a tail
]


@pytest.mark.parametrize("case", MMA_EMU_CASES, ids=lambda c: "-".join(map(str, c[:4])))
def test_tensor_core_scores_in_host_emulation(emulated_cupy, case, monkeypatch):
    """tqq_scores_mma (float16 hi/lo split on tensor cores) and the float32 kernel both meet the
    reference's float tolerance: 20 queries (two launches of 16), query scales from 1e-30 to
    1e30 and a zero query (per-query power-of-two scaling), rows not a multiple of the tile."""
    mod, cp = emulated_cupy
    d, bits, kind, rotation, n = case
    cfg = tq.QuantizerConfig(d, bits, kind=kind, rotation=rotation, seed=5)
    plan = cfg.plan()
    rng = np.random.default_rng(d + 7 * bits)
    x = make_input(rng, n, d, "unit", "float32").astype(np.float32)
    x[3] = 0.0
    y = rng.standard_normal((20, d)).astype(np.float32)
    y[1] *= 1e30
    y[2] *= 1e-30
    y[4] = 0.0
    be = tq.get_backend("cupy")
    for impl in ("mma", "fma"):
        monkeypatch.setattr(mod, "SCORES_IMPL", impl)
        assert mod.mma_scores_ok(plan) == (impl == "mma")
        scores_within_float_tolerance(
            cfg, x, y, lambda cn, yy: np.asarray(tq.Quantizer.from_config(cfg, backend="cupy").inner_product(
                cp.asarray(yy), cn.to("cupy"))))
    assert isinstance(be, mod.CupyBackend)


def test_tensor_core_score_tables():
    """The replicated pair table: float16 c_hi, int8 c_lo 2^10 and c_hi / 4 of the scaled
    centroids (c_hi + c_lo = c to float32 precision)."""
    from tq.backends.cupy_backend import mma_scores_tables
    plan = tq.QuantizerConfig(128, 4, kind="prod").plan()
    words, cinv = mma_scores_tables(plan.centroids, 3)
    assert words.dtype == np.uint32 and words.size == 64 * 16 * 2
    pair = words[:64 * 32].reshape(64, 16, 2)
    assert np.all(pair == pair[:, :1, :])  # 16 identical copies
    hw, iw = pair[:, 0, 0], pair[:, 0, 1]

    def f16(w):
        return w.astype(np.uint16).view(np.float16).astype(np.float64)

    def s8(w, i):
        return ((w >> (8 * i)) & 0xFF).astype(np.uint8).view(np.int8).astype(np.float64)

    c = np.asarray(plan.centroids, np.float64) / cinv
    e = np.arange(64)
    assert 256 <= np.abs(c).max() < 512
    for half, codes in ((0, e & 7), (1, e >> 3)):
        hi = f16((hw >> (16 * half)) & 0xFFFF)
        assert np.array_equal(hi, c[codes].astype(np.float32).astype(np.float16).astype(np.float64))
        assert np.all(np.abs(s8(iw, half) / 1024 - (c[codes] - hi)) <= 0.5 / 1024 + 1e-9)  # c_lo
        assert np.all(np.abs(s8(iw, 2 + half) * 4 - hi) <= 2.0 + 1e-9)                  # c_hi / 4


@pytest.mark.gpu
@pytest.mark.parametrize("case", MMA_EMU_CASES + [(128, 3, "prod", "hadamard", 70001), (128, 2, "mse", "haar", 4099)],
                         ids=lambda c: "-".join(map(str, c[:5])))
def test_tensor_core_scores_on_gpu(case, monkeypatch):
    """The same property on the GPU: tqq_scores_mma and the float32 kernel within the float tolerance."""
    cp = _real_cupy()
    if cp is None:
        pytest.skip("needs CuPy and a CUDA GPU")
    from tq.backends import cupy_backend as cb
    d, bits, kind, rotation, n = case
    cfg = tq.QuantizerConfig(d, bits, kind=kind, rotation=rotation, seed=9)
    rng = np.random.default_rng(n + d)
    x = make_input(rng, n, d, "unit", "float32").astype(np.float32)
    x[3] = 0.0
    y = rng.standard_normal((20, d)).astype(np.float32)
    y[1] *= 1e30
    y[2] *= 1e-30
    y[4] = 0.0
    qc = tq.Quantizer.from_config(cfg, backend="cupy")
    for impl in ("mma", "fma"):
        monkeypatch.setattr(cb, "SCORES_IMPL", impl)
        assert cb.mma_scores_ok(cfg.plan()) == (impl == "mma")
        scores_within_float_tolerance(cfg, x, y, lambda cn, yy: cp.asnumpy(qc.inner_product(cp.asarray(yy), cn.to("cupy"))))


@pytest.mark.parametrize("var,value,message", [("TQ_CUPY_QJL", "fast", "TQ_CUPY_QJL must be 'mma' or 'exact'"),
                                               ("TQ_CUPY_QJL_MG", "3", "TQ_CUPY_QJL_MG must be one of"),
                                               ("TQ_CUPY_QJL_MG", "two", "TQ_CUPY_QJL_MG must be an integer")])
def test_cupy_knobs_reject_bad_values(var, value, message):
    """A mistyped tuning variable fails at import with a message naming it (no silent default)."""
    import os
    env = dict(os.environ, **{var: value})
    r = subprocess.run([sys.executable, "-c", "import tq.backends.cupy_backend"], env=env,
                       capture_output=True, text=True)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-500:]
