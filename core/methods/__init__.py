"""Token-selection methods, registered by name."""

from core.errors import InputError
from core.methods.adakv import AdaKV
from core.methods.base import Budget, LayerInput, Method, PauseAfter, Selection
from core.methods.fastkv import FastKV
from core.methods.fullkv import FullKV
from core.methods.gemfilter import GemFilter
from core.methods.kvzip import KVzip
from core.methods.snapkv import SnapKV
from core.methods.streamingllm import StreamingLLM

METHODS: dict[str, type[Method]] = {m.name: m for m in (FastKV, FullKV, SnapKV, AdaKV, StreamingLLM, GemFilter, KVzip)}
DEFAULT_METHOD = "fastkv"  # `ask`'s, and a saved cache's that each question selects from
BUILD_METHOD = "kvzip"  # `cache build`'s, selecting once for every later question (docs/benchmarks.md, frontier)

__all__ = [
    "METHODS",
    "DEFAULT_METHOD",
    "BUILD_METHOD",
    "Budget",
    "LayerInput",
    "Method",
    "PauseAfter",
    "Selection",
    "make_method",
]


def make_method(name: str, **parameters) -> Method:
    """The method `name` with the given parameters; parameters it does not take are ignored if None."""
    if name not in METHODS:
        raise InputError(f"unknown method '{name}' (choose from {', '.join(METHODS)})")
    cls = METHODS[name]
    fields = cls.__dataclass_fields__
    unknown = [key for key, value in parameters.items() if value is not None and key not in fields]
    if unknown:
        options = ", ".join("--" + key.replace("_", "-") for key in unknown)
        raise InputError(f"{options} does not apply to --method {name}")
    return cls(**{key: value for key, value in parameters.items() if value is not None})
