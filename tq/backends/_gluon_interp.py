"""Gluon's language surface, mapped onto ``triton.language`` for Triton's interpreter.

Triton's interpreter (``TRITON_INTERPRET=1``) runs ``@triton.jit`` kernels with NumPy on the
CPU but not Gluon kernels.  The Gluon kernels in :mod:`tq.backends.triton_kernels` use only
operations that ``triton.language`` also has (loads, stores, reshapes, permutes, splits, joins,
reductions, correctly rounded division and square root); their layouts only say where the
values live, never what they are.  So under the interpreter the kernels are defined with this
module as ``gl``: layouts become ``None``, ``convert_layout`` the identity, and every other
call the ``triton.language`` operation of the same name, looked up when called (the
interpreter patches ``triton.language`` while a kernel runs).  CI checks the Gluon kernels'
bytes this way; the GPU tests check the compiled ones.
"""
from __future__ import annotations

import triton
import triton.language as tl



def _triton_annotations(fn):
    fn.__annotations__ = {k: "tl.constexpr" if v == "gl.constexpr" else v for k, v in fn.__annotations__.items()}
    return fn


def jit(fn):
    """``triton.jit`` that reads parameters annotated ``gl.constexpr`` as constexpr (the
    interpreter recognises the annotation by its text, also on the function it rewrites)."""
    kernel = triton.jit(_triton_annotations(fn))
    rewrite = kernel.rewrite
    kernel.rewrite = lambda: _triton_annotations(rewrite())
    return kernel


constexpr = tl.constexpr
float32, int32, int64, uint8 = tl.float32, tl.int32, tl.int64, tl.uint8


def BlockedLayout(*args, **kwargs):  # noqa: N802 - Gluon's name
    return None


def SliceLayout(*args, **kwargs):  # noqa: N802 - Gluon's name
    return None


def convert_layout(value, layout, assert_trivial=False):
    return value


def arange(start, end, layout=None):
    return tl.arange(start, end)


def zeros(shape, dtype, layout=None):
    return tl.zeros(shape, dtype)


def full(shape, value, dtype, layout=None):
    return tl.full(shape, value, dtype)


def _forward(name):
    def call(*args, **kwargs):
        return getattr(tl, name)(*args, **kwargs)

    call.__name__ = name
    return call


for _name in ("static_range", "program_id", "load", "store", "reshape", "permute", "split", "join", "sum", "max",
              "abs", "where", "minimum", "maximum", "div_rn", "sqrt_rn"):
    globals()[_name] = _forward(_name)
