"""TurboQuant KV cache for Hugging Face transformers (>= 5.17).

    >>> from tq.hf import TurboQuantCache, enable            # doctest: +SKIP
    >>> cache = TurboQuantCache(model.config, "K4V4")        # doctest: +SKIP
    >>> enable(model, cache)      # attention straight from the packed codes
    >>> model.generate(**inputs, past_key_values=cache, max_new_tokens=64)

See docs/KV_CACHE.md.
"""
from __future__ import annotations

try:
    import transformers as _tf
except ImportError as e:  # pragma: no cover
    raise ImportError("tq.hf needs transformers >= 5.17: pip install 'tq[hf]'") from e


def _check_version():
    from packaging.version import Version
    v = Version(_tf.__version__.split("+")[0])
    if v < Version("5.17"):
        raise ImportError(f"tq.hf needs transformers >= 5.17 (the cache layer API changed within 5.x); "
                          f"found {_tf.__version__}")


_check_version()

from .attention import attach, disable, enable, packed_attention, register, tq_attention_forward  # noqa: E402
from .cache import TurboQuantCache, TurboQuantLayer  # noqa: E402
from .config import DEFAULT_PRESETS, PRESETS, QuantSpec, parse_preset  # noqa: E402
from .graphs import CudaGraphDecoder  # noqa: E402

__all__ = [
    "TurboQuantCache", "TurboQuantLayer", "QuantSpec", "PRESETS", "DEFAULT_PRESETS", "parse_preset",
    "enable", "disable", "attach", "register", "tq_attention_forward", "packed_attention", "CudaGraphDecoder",
]
