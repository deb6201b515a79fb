"""Exact shortcuts: one recorded prefill gives every budget's cache and logits for the methods that share it.

A method's prefill trajectory (the hidden states each layer computes) depends only on which tokens
propagate, never on how many tokens enter the cache. So:

- fullkv, snapkv, adakv and streamingllm (an exact prefill, then per-layer selection) replay one full
  prefill; gemfilter replays it up to its filter layer, then prefills the chosen tokens again;
- fastkv at every budget up to its tsp_rate, uniform or head-adaptive, replays one fastkv prefill (what
  propagates depends on tsp_layer and tsp_rate, and on the budget only where that is larger);
- kvzip without TSP, at every budget, uniform, adaptive or global, replays one prefill that ran the
  reconstruction probes through every layer and recorded their scores.

A recording caches every token each layer saw and keeps each layer's last `window` queries; a
replay calls the method's own `select` on them, layer by layer, against the recorded keys, exactly
as the runner would have. tests/bench/test_bench_accuracy.py checks caches and logits bit for bit.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import ClassVar, TypeVar

from torch import Tensor

from core.documents import Document
from core.engine import Engine
from core.generation import Decoding
from core.kvcache import KVCache
from core.methods import Budget, LayerInput, Method, Selection
from core.methods.fullkv import FullKV
from core.options import BuildPlan
from core.prompt import encode_question
from core.runner import Prefill, Runner
from core.saved import SavedContext
from core.stats import RunStats, Stopwatch
from core.storage import MethodRecord

R = TypeVar("R")


@dataclass
class Recorder(Method):
    """Propagates like `inner`, caches every token, and records each layer's last queries and finishing time."""

    name: ClassVar[str] = "recorder"
    inner: Method = field(default_factory=FullKV)
    window: int = 8  # at least the scoring window of every method replayed
    windows: list[Tensor] = field(default_factory=list, repr=False)  # per layer [heads, window, head_dim]
    finished_at: list[float] = field(default_factory=list, repr=False)  # per layer, time.perf_counter()
    scores: list[Tensor] = field(default_factory=list, repr=False)  # per layer, the probes' (kvzip's inner)

    @property
    def reconstructs(self) -> bool:  # the engine makes probes for the inner method's recording
        return self.inner.reconstructs

    @property
    def chunk(self) -> int:
        return self.inner.chunk

    def reconstruction_depth(self, context_len: int, num_layers: int) -> int:
        return self.inner.reconstruction_depth(context_len, num_layers)

    def select(self, layer: LayerInput) -> Selection:
        self.finished_at.append(time.perf_counter())
        self.windows.append(layer.q[:, -self.window :].clone())
        if layer.reconstruction is not None:
            self.scores.append(layer.reconstruction)
        return Selection(propagate=self.inner.select(layer).propagate)


@dataclass
class Recording:
    """One recorded prefill: what every replay of it starts from."""

    inner: Method  # the method whose propagation it followed
    cache: KVCache  # every token each layer saw
    windows: list[Tensor]
    seconds: float  # the whole prefill
    logits: Tensor | None = None  # [vocab]; None for a saved context, which predicts no token
    layer_tokens: list[int] = field(default_factory=list)
    ids: Tensor | None = None  # [L] the prompt, for a method that prefills a subset again; None for a build
    layer_s: list[float] = field(default_factory=list)  # with ids: seconds to the end of each layer
    scores: list[Tensor] | None = None  # per layer, the reconstruction probes' scores (a kvzip recording)


def propagates_alike(method: Method, inner: Method, context_len: int) -> bool:
    """Whether `method` sends the same tokens to deeper layers as `inner` on a prompt of `context_len`
    tokens (only then is a replay exact). For fastkv the budget matters only where it is larger than
    tsp_rate: then it is what propagates; how the cache's budget is shared across heads never does."""
    if method.reconstructs and not inner.reconstructs:
        return False  # kvzip replays only a recording that holds its probes' scores
    if not method.propagates:
        return not inner.propagates
    if type(method) is not type(inner):
        return False
    if replace(method, budget=inner.budget, tsp_rate=inner.tsp_rate, head_budget=inner.head_budget) != inner:
        return False
    return method.propagated_tokens(context_len) == inner.propagated_tokens(context_len)


def record_prefill(runner: Runner, ids: Tensor, inner: Method, window: int = 8) -> Recording:
    """runner.prefill(ids) propagating like `inner`, recorded."""
    recorder = Recorder(inner, window)
    start = time.perf_counter()
    prefill = runner.prefill(ids, recorder)
    seconds = time.perf_counter() - start
    layer_s = [t - start for t in recorder.finished_at]
    return Recording(
        inner, prefill.cache, recorder.windows, seconds, prefill.logits, prefill.layer_tokens, ids, layer_s
    )


def record_build(
    engine: Engine, documents: list[Document], inner: Method, reserved: int, window: int = 8
) -> tuple[SavedContext, Recording]:
    """engine.build(documents) propagating like `inner`, recorded: the saved context and its recording."""
    recorder = Recorder(inner, window)
    saved = engine.build(documents, BuildPlan(recorder), reserved=reserved)
    scores = recorder.scores or None
    return saved, Recording(inner, saved.cache, recorder.windows, saved.stats.prefill_s, scores=scores)


def replay(runner: Runner, recording: Recording, method: Method) -> tuple[Prefill, float]:
    """What runner.prefill(ids, method) returns, from the recording; and the seconds that prefill takes
    (the recorded prefill's, up to where the method's own work starts, plus that work)."""
    if not propagates_alike(method, recording.inner, recording.cache.seq_len):
        raise ValueError(f"{method} does not propagate like the recorded {recording.inner}")
    if getattr(method, "scoring_window", 0) > recording.windows[0].shape[1]:
        raise ValueError(f"{method} scores with more queries than the recording kept")
    cache, start = recording.cache, time.perf_counter()
    layers, deferred = [], []
    scores = recording.scores or [None] * len(cache.layers)
    for i, (layer, q, reconstruction) in enumerate(zip(cache.layers, recording.windows, scores, strict=True)):
        context = LayerInput(i, len(cache.layers), cache.seq_len, q, layer.keys, layer.valid, reconstruction)
        selection = method.select(context)
        if selection.restart is not None:  # gemfilter: the same call the runner makes
            if recording.ids is None:
                raise ValueError(f"{method.name} prefills again, which a saved context cannot")
            restarted = runner.prefill(recording.ids[selection.restart], FullKV())
            restarted.layer_tokens = recording.layer_tokens[: i + 1] + restarted.layer_tokens
            return restarted, recording.layer_s[i] + time.perf_counter() - start
        layers.append(layer if selection.keep is None else layer.select(selection.keep))
        if selection.deferred is not None:
            deferred.append(selection.deferred)
    if deferred:  # the same selection over every layer the runner makes at the end
        keeps = method.select_deferred(deferred, cache.seq_len)
        layers = [layer.select(keep) for layer, keep in zip(layers, keeps, strict=True)]
    prefill = Prefill(KVCache(layers, cache.seq_len), recording.logits, recording.layer_tokens)
    return prefill, recording.seconds + time.perf_counter() - start


def replay_build(
    runner: Runner, saved: SavedContext, recording: Recording, method: Method, query_budget: Budget | None
) -> SavedContext:
    """What engine.build(documents, BuildPlan(method, query_budget)) returns, from a recorded build of them."""
    prefill, seconds = replay(runner, recording, method)
    stats = replace(
        saved.stats,
        prefill_s=seconds,
        kv_bytes_kept=prefill.cache.nbytes,
        kept_tokens_per_layer=prefill.cache.kept_tokens_per_layer,
    )
    return replace(as_built(saved, method, query_budget), cache=prefill.cache, stats=stats)


def as_built(saved: SavedContext, method: Method, query_budget: Budget | None) -> SavedContext:
    """`saved` with the manifest engine.build writes for `method` and `query_budget`, which is what each query
    selects by; a paused build serves every budget of its method this way."""
    manifest = replace(
        saved.manifest,
        method=MethodRecord(method.name, method.parameters()),
        query_budget=None if query_budget is None else str(query_budget),
    )
    return replace(saved, manifest=manifest)


def shared_recordings(
    record: Callable[[Method], R], recording_of: Callable[[R], Recording] = lambda result: result
) -> Callable[[Method], R]:
    """For each method, a recording it can replay, made on first need: one per kind of propagation
    (a full prefill for the methods that neither propagate nor reconstruct, fastkv's own for each count it
    propagates, kvzip's probes through every layer for kvzip)."""
    made: list[R] = []

    def recording_for(method: Method) -> R:
        for result in made:
            recording = recording_of(result)
            if propagates_alike(method, recording.inner, recording.cache.seq_len):
                return result
        made.append(record(method if method.propagates or method.reconstructs else FullKV()))
        return made[-1]

    return recording_for


def question_recordings(runner: Runner, ids: Tensor, question_tokens: int, window: int = 8) -> Callable:
    """shared_recordings of runner.prefill(ids) that keep each layer's last `window` queries, or the
    question's `question_tokens` where that is more: enough for any fixed window up to `window` and for a
    window that is the question."""
    return shared_recordings(partial(record_prefill, runner, ids, window=max(window, question_tokens)))


def question_ids(engine: Engine, question: str) -> list[int]:
    """The question's tokens, as engine.ask and engine.query append them to the documents' context."""
    return encode_question(engine.loaded.tokenizer, engine.template, question)


def ask_ids(engine: Engine, documents: list[Document], question: list[int], max_new_tokens: int) -> Tensor:
    """The prompt engine.ask prefills for the question's ids [L]: what a recording of its prefill runs."""
    return engine.tensor(engine.ask_prompt(documents, question, max_new_tokens)[1])


def decoded(engine: Engine, prefill: Prefill, decoding: Decoding) -> str:
    """The answer engine.ask decodes from `prefill`, on a copy of its cache: a replay's layers may be the
    recording's own, which every other replay of it starts from."""
    return engine.decode(prefill.cache.clone(), prefill.logits, decoding, lambda text: None, RunStats(), Stopwatch())
