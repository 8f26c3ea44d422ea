"""Run-time compilation of tq/kernels/decode*.cu with CuPy (NVRTC) and launches on torch's stream.

CuPy and torch are imported lazily: importing this module needs neither.
One NVRTC module per (P, key bits, value bits, n_rep, dtypes) holds the store,
split kernels of that configuration; modules are cached per process.
"""
from __future__ import annotations

import functools
import os
import threading

import numpy as np

_KDIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
_LOCK = threading.Lock()
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}


def kernel_source() -> str:
    """decode_common.cuh followed by decode.cu (NVRTC gets one string, no include paths)."""
    with open(os.path.join(_KDIR, "decode_common.cuh")) as f:
        common = f.read()
    with open(os.path.join(_KDIR, "decode.cu")) as f:
        body = f.read()
    return common.replace("#pragma once", "") + "\n" + body


def dtype_code(dtype) -> int:
    name = str(dtype).replace("torch.", "")
    if name not in DTYPE_CODES:
        raise TypeError(f"unsupported dtype {dtype}; expected float32, float16 or bfloat16")
    return DTYPE_CODES[name]


class Module:
    """Compiled kernels of one configuration (``kind`` "store" or "decode")."""

    def __init__(self, kind: str, p: int, kb: int, vb: int, nrep: int, wt: int, qt: int, ot: int,
                 defines: tuple[str, ...] = ()):
        import cupy as cp

        self.p, self.kb, self.vb, self.nrep = p, kb, vb, nrep
        self.mmt_prmt, self.prmt_level = False, 0
        dsplit = 2 if p >= 256 else 1
        if kind == "store":
            self.names = {"store": f"tq_store<{p},{kb},{vb},{wt}>"}
        elif kind == "decode_v1":  # first version: byte-permute look-ups (kept for the notes)
            self.names = {"mma_v1": f"tq_split_mma<{p},{kb},{vb},{nrep},{dsplit},{qt},0,{wt},{ot}>" if nrep <= 16 else None}
        else:
            from .layout import mmt_config, mmt_prmt
            # TQ_PRMT_LUT as decode.cu sees it (it needs TQ_TILE_SOURCE)
            self.prmt_level = define_value(defines, "TQ_PRMT_LUT") if define_value(defines, "TQ_TILE_SOURCE") else 0
            self.mmt_prmt = mmt_prmt(p, kb, vb, nrep, self.prmt_level)  # the byte-permute table layout
            self.mmt_stages, self.mmt_blocks = mmt_config(p, kb, vb, nrep, self.prmt_level)
            # per-variant override for benchmarks ("-DTQ_MMT_STAGES=3 -DTQ_MMT_BLOCKS=3"; the
            # kernels ignore these macros, they only pick the template arguments)
            self.mmt_stages = define_value(defines, "TQ_MMT_STAGES", self.mmt_stages)
            self.mmt_blocks = define_value(defines, "TQ_MMT_BLOCKS", self.mmt_blocks)
            self.names = {
                "mmt": (f"tq_split_mmt<{p},{kb},{vb},{nrep},{dsplit},{qt},{wt},{ot},{self.mmt_stages},"
                        f"{self.mmt_blocks}>" if nrep <= 16 else None),
                "mma": f"tq_split_mma<{p},{kb},{vb},{nrep},{dsplit},{qt},1,{wt},{ot}>" if nrep <= 16 else None,
                "fma": f"tq_split_fma<{p},{kb},{vb},{nrep},{qt},{wt},{ot}>",
            }
        exprs = [n for n in self.names.values() if n]
        self.defines = tuple(defines)
        self.module = cp.RawModule(code=kernel_source(), options=("-std=c++17",) + compile_defines(self.defines),
                                   name_expressions=exprs)
        self.kernels = {k: (self.module.get_function(n) if n else None) for k, n in self.names.items()}
        self._smem_set: dict[str, int] = {}


    def _prepare(self, which: str, shared_mem: int):
        k = self.kernels.get(which)
        if k is None:
            raise ValueError(f"kernel {which!r} is not available for n_rep={self.nrep}")
        if shared_mem > 48 * 1024 and self._smem_set.get(which, 0) < shared_mem:
            k.max_dynamic_shared_size_bytes = shared_mem
            self._smem_set[which] = shared_mem
        return k

    def launch(self, which: str, grid, block, args, shared_mem: int = 0, stream=None):
        """Launch through CuPy's RawKernel call (slow path, any argument types)."""
        k = self._prepare(which, shared_mem)
        if stream is None:
            k(tuple(grid), tuple(block), args, shared_mem=shared_mem)
        else:
            with stream:
                k(tuple(grid), tuple(block), args, shared_mem=shared_mem)

    def make_launcher(self, which: str, args, shared_mem: int, device_index: int = 0) -> "RawLauncher":
        """A cuLaunchKernel call site with its arguments in ctypes cells (see RawLauncher)."""
        import cupy as cp

        with cp.cuda.Device(device_index):
            k = self._prepare(which, shared_mem)
            return RawLauncher(k, args, shared_mem)


class RawLauncher:
    """One kernel call site: parameters live in ctypes cells, so a call rewrites
    only the values that changed (``set``) and calls cuLaunchKernel (a few
    microseconds of host time instead of CuPy's argument processing).

    ``args``: NumPy scalars (np.uint64 pointers, np.int32 / np.int64 / np.float32)
    giving each parameter's C type and initial value.
    """

    def __init__(self, kernel, args, shared_mem: int):
        import ctypes

        from cupy.cuda import driver

        self._launch = driver.launchKernel
        self.fptr = int(kernel.kernel.ptr)
        self.shared_mem = int(shared_mem)
        self.cells = []
        for a in args:
            dt = np.asarray(a).dtype
            ct = {np.dtype(np.uint64): ctypes.c_uint64, np.dtype(np.int64): ctypes.c_int64,
                  np.dtype(np.int32): ctypes.c_int32, np.dtype(np.float32): ctypes.c_float}[dt]
            self.cells.append(ct(a.item()))
        self.params = (ctypes.c_void_p * len(self.cells))(*[ctypes.addressof(c) for c in self.cells])
        self.params_ptr = ctypes.addressof(self.params)

    def set(self, i: int, value) -> None:
        self.cells[i].value = value

    def __call__(self, grid, block: int, stream_handle: int) -> None:
        gx, gy, gz = tuple(grid) + (1,) * (3 - len(grid))
        self._launch(self.fptr, gx, gy, gz, block, 1, 1, self.shared_mem, stream_handle, self.params_ptr, 0)


_DEFINES: tuple[str, ...] | None = None  # the compile-time variant; None: not read yet


# Compile-time switches of tq/kernels/decode.cu and their defaults.  NVRTC always gets
# them explicitly (compile_defines), so these values, not the .cu's #ifndef fallbacks,
# decide what tq.cuda runs; tests/test_decode_kernel.py checks that the two agree.
#   TQ_TILE_SOURCE: split warps request tiles through TileSource (decode.cu).
#   TQ_PRMT_LUT: tq_split_mmt's byte-permute key table for K4/V4 (2: also K4/V2).
DECODE_DEFAULTS = {"TQ_TILE_SOURCE": 1, "TQ_PRMT_LUT": 1, "TQ_SEG_TILES": 4, "TQ_STEAL": 1,
                   "TQ_SPLIT_INTERLEAVE": 1, "TQ_LATE_PREFETCH": 1}


def define_value(defines, name: str, default: int | None = None) -> int:
    """The integer value of macro ``name`` in compiler options ("-DNAME=V"; "-DNAME" is 1),
    else ``default``, else its ``DECODE_DEFAULTS`` value, else 0."""
    value = DECODE_DEFAULTS.get(name, 0) if default is None else default
    for d in defines:
        if d.startswith("-D"):
            key, sep, v = d[2:].partition("=")
            if key == name:
                value = int(v, 0) if sep else 1
    return value


def compile_defines(defines) -> tuple[str, ...]:
    """NVRTC options for a variant: every ``DECODE_DEFAULTS`` switch the variant does not
    set, then the variant's own options."""
    named = {d[2:].partition("=")[0] for d in defines if d.startswith("-D")}
    return tuple(f"-D{k}={v}" for k, v in DECODE_DEFAULTS.items() if k not in named) + tuple(defines)


def decode_defines() -> tuple[str, ...]:
    """Compile-time variant of the decode kernels, for benchmarks only:
    ``TQ_DECODE_DEFINES="-DNAME=VALUE ..."``, read when the first module is requested (not
    at every decode call: this is on the launch path), or set by ``set_decode_defines``."""
    global _DEFINES
    if _DEFINES is None:
        _DEFINES = tuple(os.environ.get("TQ_DECODE_DEFINES", "").split())
    return _DEFINES


def set_decode_defines(defines: str | None) -> None:
    """Compile the modules requested from now on with ``defines`` ("-DNAME=VALUE ..."); None:
    read TQ_DECODE_DEFINES again.  Each variant is its own cached module, so one process can
    time several side by side (``benchmarks/bench_decode.py --variants``)."""
    global _DEFINES
    _DEFINES = None if defines is None else tuple(defines.split())


def get_module(kind: str, p: int, kb: int, vb: int, nrep: int = 1, wt: int = 2, qt: int = 2, ot: int = 2) -> Module:
    return _get_module(kind, p, kb, vb, nrep, wt, qt, ot, decode_defines())


@functools.lru_cache(maxsize=None)
def _get_module(kind, p, kb, vb, nrep, wt, qt, ot, defines) -> Module:
    with _LOCK:
        if kind == "store":
            return _get_store(p, kb, vb, wt, defines)
        return Module(kind, p, kb, vb, nrep, wt, qt, ot, defines)


@functools.lru_cache(maxsize=None)
def _get_store(p, kb, vb, wt, defines=()):
    return Module("store", p, kb, vb, 1, wt, 0, 0, defines)


_STREAMS: dict = {}


def cupy_stream(torch_stream):
    """A CuPy view of a torch CUDA stream (cached by handle)."""
    import cupy as cp

    key = (torch_stream.cuda_stream, torch_stream.device.index)
    s = _STREAMS.get(key)
    if s is None:
        s = cp.cuda.ExternalStream(torch_stream.cuda_stream, torch_stream.device.index)
        _STREAMS[key] = s
    return s


def ptr(t) -> np.uint64:
    """Raw device pointer of a torch tensor (or 0 for None) as a kernel argument."""
    return np.uint64(0 if t is None else t.data_ptr())


def i32(x) -> np.int32:
    return np.int32(x)


def i64(x) -> np.int64:
    return np.int64(x)


def f32(x) -> np.float32:
    return np.float32(x)
