"""The interface every backend implements, and the registry they join.

A backend executes a :class:`tq.config.Plan`; it never chooses parameters.  It
provides array conversion plus three kernels:

* ``encode(plan, x)``: x (n, dim) float array -> :class:`Parts` (packed sections)
* ``decode(plan, parts)``: -> (n, dim) float32
* ``scores(plan, q, parts)``: queries (m, dim) -> estimated <q_i, x_j>, (m, n) float32

Inputs reach the kernels already validated (shape, dtype, finiteness) by the
core, as 2-D arrays of the backend's own array type.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

__all__ = ["Backend", "Parts", "register_backend", "get_backend", "available_backends", "backend_names"]


@dataclass
class Parts:
    """The four sections of a packed batch (docs/FORMAT.md), as backend arrays.

    codes (n, code_bytes) uint8; norms (n,) norm dtype; qjl (n, qjl_bytes) uint8;
    rnorms (n,) norm dtype.  Sections a config does not use have zero width.
    """

    codes: Any
    norms: Any
    qjl: Any
    rnorms: Any


class Backend:
    """Base class: subclasses set ``name`` and implement the methods below."""

    name: str = ""
    #: a short hint shown when the backend cannot be used
    install_hint: str = ""

    @classmethod
    def is_available(cls) -> bool:
        return True

    # -- arrays ---------------------------------------------------------
    def owns(self, x) -> bool:
        """Is x this backend's native array type?"""
        raise NotImplementedError

    def asarray(self, x):
        """Convert array-like input to the native type (no copy when possible)."""
        raise NotImplementedError

    def shape_dtype(self, x) -> tuple[tuple[int, ...], str]:
        """Shape and a NumPy-style dtype name ('float32', 'bfloat16', 'int64', ...)."""
        raise NotImplementedError

    def all_finite(self, x) -> bool:
        raise NotImplementedError

    def reshape(self, x, shape):
        return x.reshape(shape)

    def to_numpy(self, a):
        raise NotImplementedError

    def from_numpy(self, a, device=None):
        """Native array from a NumPy array, on ``device`` where the backend has devices."""
        raise NotImplementedError

    # -- kernels --------------------------------------------------------
    def encode(self, plan, x) -> Parts:
        raise NotImplementedError

    def decode(self, plan, parts: Parts):
        raise NotImplementedError

    def scores(self, plan, q, parts: Parts):
        raise NotImplementedError


# name -> module that registers it on import; third parties call register_backend.
_BUILTIN = {
    "numpy": "tq.backends.numpy_backend",
    "numba": "tq.backends.numba_backend",
    "torch": "tq.backends.torch_backend",
    "torch-compiled": "tq.backends.torch_backend",
    "torch-triton": "tq.backends.triton_backend",
    "cupy": "tq.backends.cupy_backend",
}
_REGISTRY: dict[str, type[Backend]] = {}
_INSTANCES: dict[str, Backend] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make ``cls`` available as ``backend=cls.name``."""
    if not cls.name:
        raise ValueError("a backend class needs a non-empty `name`")
    _REGISTRY[cls.name] = cls
    _INSTANCES.pop(cls.name, None)
    return cls


def backend_names() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def _load(name: str) -> type[Backend] | None:
    if name not in _REGISTRY and name in _BUILTIN:
        try:
            importlib.import_module(_BUILTIN[name])
        except ImportError:
            return None
    return _REGISTRY.get(name)


def get_backend(name: str | Backend) -> Backend:
    """The backend instance for ``name``, with a clear error if unknown or unusable."""
    if isinstance(name, Backend):
        return name
    if not isinstance(name, str) or name not in backend_names():
        raise ValueError(f"unknown backend {name!r}; known backends: {backend_names()}")
    if name in _INSTANCES:
        return _INSTANCES[name]
    cls = _load(name)
    if cls is None or not cls.is_available():
        hint = cls.install_hint if cls is not None else _HINTS.get(name, "")
        raise RuntimeError(f"backend {name!r} is not available on this machine. {hint}".strip())
    _INSTANCES[name] = cls()
    return _INSTANCES[name]


def available_backends() -> list[str]:
    """Names of the backends that can run here (imports optional dependencies to check)."""
    out = []
    for name in backend_names():
        cls = _load(name)
        try:
            if cls is not None and cls.is_available():
                out.append(name)
        except Exception:  # a broken optional install must not break the listing
            pass
    return out


_HINTS: dict[str, str] = {
    "numba": "Install it with `pip install numba`.",
    "torch": "Install it with `pip install tq[torch]` (or `pip install torch`).",
    "torch-compiled": "Install it with `pip install tq[torch]` (or `pip install torch`).",
    "torch-triton": "It needs torch with Triton (CUDA builds of torch ship it): `pip install tq[torch] triton`.",
    "cupy": "It needs an NVIDIA GPU and CuPy: `pip install tq[cuda12]` or `tq[cuda13]`.",
}

