"""A prefilled context saved without its question: what `cache build` writes and reports, what `cache query`
loads, and how each question selects from it."""

from dataclasses import dataclass, field, replace
from pathlib import Path

from core.kvcache import KVCache
from core.methods import Budget, Method
from core.methods.snapkv import SnapKV
from core.stats import RunStats, SharedLoad
from core.storage import Manifest, ModelFingerprint, quantization_for


@dataclass
class SavedContext:
    """A prefilled context without its question: what `cache build` saves and `cache query` loads."""

    cache: KVCache
    manifest: Manifest
    stats: RunStats  # of the build that made it (empty for a loaded file)
    load: SharedLoad = field(default_factory=SharedLoad)  # reading it from its file: the first answer reports it


def query_method(manifest: Manifest, budget: Budget | None, question_tokens: int) -> Method | None:
    """How a query selects from a saved context. A query-aware (paused) cache: the method it was built
    with, at `budget` if given, exactly as `ask` runs it. Otherwise two-stage selection: the question's
    own tokens score the stored ones and keep `budget` (default: the file's query budget); None when
    answers should use every stored token."""
    parameters = manifest.method.parameters
    if manifest.paused_layer is not None:
        resumed = replace(manifest.method, parameters={**parameters, "budget": budget or parameters["budget"]})
        return resumed.make().for_question(question_tokens)
    if budget is None and manifest.query_budget is not None:
        budget = Budget.parse(manifest.query_budget)
    if budget is None:
        return None
    return SnapKV(budget, window=question_tokens, pooling=parameters.get("pooling", "maxpool"))


def fullkv_file_bytes(model: ModelFingerprint, tokens: int) -> int:
    """The tensor bytes of a float16 cache of every token: the yardstick a saved file's size is read against."""
    per_token = model.num_layers * model.num_kv_heads * (2 * model.head_dim * 2 + 4)  # K, V, position
    return per_token * tokens


@dataclass
class BuiltCache:
    """A saved context written to `output`: what `cache build` reports."""

    saved: SavedContext
    output: Path
    file_bytes: int
    save_s: float
    storage: str

    def to_dict(self) -> dict:
        """What `cache build --json` prints: the stable keys output/file_bytes/save_s, the kind of cache, its
        storage and its size against a float16 cache of every token, then the run's stats."""
        manifest = self.saved.manifest
        scheme = quantization_for(self.storage, manifest.model, manifest.paused_layer)
        full = fullkv_file_bytes(manifest.model, manifest.context_tokens)
        return {
            "output": str(self.output),
            "file_bytes": self.file_bytes,
            "save_s": self.save_s,
            "model": manifest.model.name,
            "method": manifest.method.name,
            "budget": manifest.method.parameters.get("budget"),
            "kind": manifest.kind,
            "query_budget": manifest.query_budget,
            "paused_layer": manifest.paused_layer,
            "cache_dtype": self.storage,
            "quantization": None if scheme is None else scheme.to_dict(),
            "fullkv_float16_bytes": full,
            "file_share_of_fullkv_float16": self.file_bytes / full,
            **self.saved.stats.to_dict(),
        }
