"""The Python API over the engine: load a model once, then answer questions about documents."""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

import torch

from core import __version__ as FASTKV_VERSION
from core.documents import Document
from core.errors import CacheFileError, ContextOverflowError, FastKVError, InputError
from core.generation import Decoding, TextStream, generate, stop_token_ids
from core.kvcache import KVCache, full_kv_bytes
from core.memory import MemoryGuard
from core.methods import Budget, Method, PauseAfter
from core.models import LoadedModel, load_model, model_fingerprint, tokenizer_sha256
from core.options import BuildPlan, MethodOptions
from core.progress import Progress, no_progress
from core.prompt import Context, PromptTemplate, check_truncate, encode_context, encode_question, fit_context
from core.reconstruction import Probe, probes_for
from core.runner import Runner
from core.saved import BuiltCache, SavedContext, query_method
from core.stats import RunStats, SharedLoad, Stopwatch
from core.storage import (
    DocumentRecord,
    Manifest,
    MethodRecord,
    ModelFingerprint,
    Template,
    check_target,
    load_cache,
    read_manifest,
    save_cache,
)
from core.token_limit import TokenLimit

QUESTION_RESERVE = 256  # tokens a saved context leaves free in the window for a question and its answer


@dataclass
class Answer:
    question: str
    text: str
    model: str
    method: str
    budget: str | None
    documents: list[dict]  # name, sha256, pages, tokens
    stats: RunStats
    logits: torch.Tensor | None = field(default=None, repr=False)  # [vocab]: what the first answer token came from

    def to_dict(self) -> dict:
        """The stable `--json` schema: fields are added over time, never renamed."""
        return {
            "question": self.question,
            "answer": self.text,
            "model": self.model,
            "method": self.method,
            "budget": self.budget,
            "documents": self.documents,
            "stats": self.stats.to_dict(),
        }


def document_records(documents: list[Document], context: Context) -> tuple[DocumentRecord, ...]:
    """Each document as a saved context records it: its tokens in the context and each page's token span."""
    return tuple(
        DocumentRecord(doc.name, doc.sha256, doc.pages, tokens, doc.size, tuple(spans))
        for doc, tokens, spans in zip(documents, context.tokens_per_document, context.page_token_spans, strict=True)
    )


def document_summaries(documents: list[Document], context: Context) -> list[dict]:
    """Per document: name, sha256, pages, the tokens in the context and how many pages have some there."""
    return [record.summary() for record in document_records(documents, context)]


def memory_room(guard: MemoryGuard | None, truncate: str | None, method: Method, extra: int, **kw) -> int | None:
    """How many context tokens memory allows, for truncation to honour (None: no limit to apply;
    when not even `extra` prompt tokens fit, the guard's own check explains it)."""
    if guard is None or truncate is None:
        return None
    most = guard.most_tokens(method, **kw) - extra
    return most if most > 0 else None


class Engine:
    """A loaded model with its runner and prompt template; reused for every question in a process. Its load
    is in the stats of the first run (ask, build or query) only: the later ones did not wait for it."""

    def __init__(self, loaded: LoadedModel, load_s: float | None = None):
        self.loaded = loaded
        self.model_load = SharedLoad(load_s)
        self.runner = Runner(loaded.model)
        self.template = PromptTemplate.for_tokenizer(loaded.tokenizer)
        self.stop_ids = stop_token_ids(loaded.model, loaded.tokenizer)

    @classmethod
    def load(
        cls,
        model: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        progress: Progress = no_progress,
    ) -> "Engine":
        start = time.perf_counter()
        loaded = load_model(model, device, dtype, progress)
        return cls(loaded, time.perf_counter() - start)

    @property
    def load_s(self) -> float | None:
        """How long loading the model took (Engine.load), whether or not a run has reported it yet."""
        return self.model_load.seconds

    @cached_property
    def longest_token(self) -> int:
        """Characters of the longest vocabulary entry (byte-level entries: one per byte): no token covers more
        of a text."""
        return max(len(token) for token in self.loaded.tokenizer.get_vocab())

    def count_tokens(self, text: str) -> int:
        return len(self.loaded.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def token_limit(self, reserved: int, truncate: str | None) -> TokenLimit:
        """What reading the documents may keep: the window less `reserved` tokens (question and answer)."""
        check_truncate(truncate)
        window = self.loaded.context_window
        return TokenLimit(window - reserved, self.count_tokens, self.longest_token, window, reserved, truncate)

    def ask_limit(self, question: str, max_new_tokens: int, truncate: str | None) -> TokenLimit:
        """The documents' limit for `ask`: what the question and its answer leave of the window."""
        question_ids = encode_question(self.loaded.tokenizer, self.template, question)
        return self.token_limit(len(question_ids) + max_new_tokens, truncate)

    def build_limit(self, truncate: str | None, reserved: int = QUESTION_RESERVE) -> TokenLimit:
        """The documents' limit for `build`: what a later question and answer will need is kept free."""
        return self.token_limit(min(reserved, self.loaded.context_window // 4), truncate)

    def tensor(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.loaded.device)

    def ask(
        self,
        documents: list[Document],
        question: str,
        method: Method | None = None,
        decoding: Decoding = Decoding(),
        truncate: str | None = None,
        on_text: Callable[[str], None] = lambda text: None,
        progress: Progress = no_progress,
        ignore_memory: bool = False,
    ) -> Answer:
        """Prefill documents + question in one pass and decode the answer.

        The question ends the prompt, so the method's scoring window is the question itself
        (query-aware selection, as in the FastKV paper). Unless `ignore_memory`, a prefill that
        would not fit the device's free memory is refused before it starts (MemoryLimitError);
        with `truncate`, the documents are cut to what fits.
        """
        stats, clock = RunStats(), Stopwatch()
        question_ids = encode_question(self.loaded.tokenizer, self.template, question)
        method = (method or MethodOptions().make()).for_question(len(question_ids))
        if method.reconstructs:
            raise InputError(f"--method {method.name} selects without the question, for a saved cache: use cache build")
        guard = None if ignore_memory else MemoryGuard.for_model(self.loaded.model)
        new_tokens, extra = decoding.max_new_tokens, len(question_ids)
        most = memory_room(guard, truncate, method, extra, new_tokens=new_tokens)
        context, prompt = self.ask_prompt(documents, question_ids, new_tokens, truncate, most)
        if guard:
            guard.check(len(context.ids) + extra, method, new_tokens, truncating=truncate is not None)
        stats.tokenize_s = clock.lap()
        prefill = self.runner.prefill(self.tensor(prompt), method, progress)
        stats.prefill_s = clock.lap()
        stats.context_tokens, stats.dropped_tokens = len(context.ids) + len(question_ids), context.dropped_tokens
        stats.dropped_tokens_estimated = context.dropped_estimated
        stats.layer_tokens = prefill.layer_tokens
        self.record_cache(stats, prefill.cache)
        text = self.decode(prefill.cache, prefill.logits, decoding, on_text, stats, clock)
        stats.load_s = self.model_load.claim()
        summaries = document_summaries(documents, context)
        return Answer(
            question, text, self.loaded.name, method.name, method.budget_label, summaries, stats, prefill.logits
        )

    def ask_prompt(
        self,
        documents: list[Document],
        question_ids: list[int],
        max_new_tokens: int,
        truncate: str | None = None,
        most: int | None = None,
    ) -> tuple[Context, list[int]]:
        """What `ask` prefills: the documents' context, fitted to what the question and its answer leave of the
        window (see `context`), and the prompt's ids, that context then the question."""
        context = self.context(documents, len(question_ids) + max_new_tokens, truncate, most)
        return context, context.ids + question_ids

    def context(
        self, documents: list[Document], reserved: int, truncate: str | None, most: int | None = None
    ) -> Context:
        """The documents' tokens, fitted to the window with `reserved` tokens left for question and answer;
        truncation also cuts them to `most` tokens (what memory allows), if given."""
        window = self.loaded.context_window
        encoded = encode_context(self.loaded.tokenizer, self.template, documents)
        room = window - reserved if most is None or truncate is None else max(min(window - reserved, most), 0)
        return fit_context(encoded, room, window, reserved, truncate)

    def build(
        self,
        documents: list[Document],
        plan: BuildPlan,
        progress: Progress = no_progress,
        reserved: int = QUESTION_RESERVE,
    ) -> SavedContext:
        """Prefill the documents without knowing the question, for a cache to save and query later.

        Steering questions (`plan.questions`) are appended for the prefill so their tokens are the scoring
        window, then dropped from the cache. `plan.query_budget` is what each query re-selects the stored
        tokens down to, with its own question as the window (two-stage). A query-aware plan pauses the
        prefill at the layer from which its method selects by the question (fastkv's TSP layer), caching
        every token up to there; each query resumes it with the method and its own question, so it answers
        exactly as `ask` (a larger file, a longer query). Memory is checked as in `ask`, including saving
        the cache in the plan's storage; `reserved` tokens of the window are left for a question and answer.
        """
        method, truncate, storage = plan.method, plan.truncate, plan.storage
        pause = method.pause_layer(self.runner.num_layers) if plan.query_aware else None
        stats, clock = RunStats(), Stopwatch()
        steering = [t for q in plan.questions for t in encode_question(self.loaded.tokenizer, self.template, q)]
        guard = None if plan.ignore_memory else MemoryGuard.for_model(self.loaded.model)
        prefilled = method if pause is None else PauseAfter(pause, window=method.window or 0)
        most = memory_room(guard, truncate, prefilled, len(steering), saved_dtype=storage)
        context = self.context(documents, min(reserved, self.loaded.context_window // 4), truncate, most)
        selection = prefilled.steered(len(context.ids), len(steering))
        if guard:
            tokens = len(context.ids) + len(steering)
            guard.check(tokens, selection, saved_dtype=storage, truncating=truncate is not None)
        stats.tokenize_s = clock.lap()
        probes = self.probes(context.ids, method)
        prefill = self.runner.prefill(self.tensor(context.ids + steering), selection, progress, probes)
        cache = prefill.cache.without_last(len(steering))
        stats.prefill_s = clock.lap()
        stats.context_tokens, stats.dropped_tokens = len(context.ids), context.dropped_tokens
        stats.dropped_tokens_estimated, stats.layer_tokens = context.dropped_estimated, prefill.layer_tokens
        self.record_cache(stats, cache)
        stats.load_s = self.model_load.claim()
        return SavedContext(cache, self.manifest(documents, context, plan, pause), stats)

    def probes(self, context_ids: list[int], method: Method) -> list[Probe]:
        """The reconstruction probes of a method that scores with them (KVzip), on this device."""
        if not method.reconstructs:
            return []
        return probes_for(self.loaded.tokenizer, self.template, context_ids, method.chunk, self.loaded.device)

    def manifest(self, documents: list[Document], context: Context, plan: BuildPlan, pause: int | None) -> Manifest:
        """What a saved context records of its model, method, context and documents (the file adds its storage)."""
        return Manifest(
            fastkv_version=FASTKV_VERSION,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            model=ModelFingerprint(name=self.loaded.name, spec=self.loaded.spec, **model_fingerprint(self.loaded)),
            tokenizer_sha256=tokenizer_sha256(self.loaded.tokenizer),
            method=MethodRecord(plan.method.name, plan.method.parameters()),
            query_budget=None if plan.query_budget is None else str(plan.query_budget),
            steering_questions=len(plan.questions),
            paused_layer=pause,
            policy=plan.method.resolved(len(context.ids), self.runner.num_layers),
            context_tokens=len(context.ids),
            dropped_tokens=context.dropped_tokens,
            template=Template(self.template.question_prefix, self.template.tail),
            documents=document_records(documents, context),
        )

    def build_file(
        self,
        documents: list[Document],
        output: Path,
        plan: BuildPlan,
        overwrite: bool = False,
        progress: Progress = no_progress,
    ) -> BuiltCache:
        """`cache build`: prefill the documents as `plan` says and write the cache to `output` atomically
        (refused before any work if `output` exists and not `overwrite`)."""
        check_target(output, overwrite)
        saved = self.build(documents, plan, progress)
        progress("saving", 0, 1)
        start = time.perf_counter()
        size = save_cache(output, saved.cache, saved.manifest, plan.storage, overwrite, self.runner)
        progress("saving", 1, 1)
        return BuiltCache(saved, output, size, time.perf_counter() - start, plan.storage)

    def is_built(self, output: Path, documents: list[Document], plan: BuildPlan) -> bool:
        """Whether `output` is a valid cache of these documents' bytes, built with this model, tokenizer, method,
        parameters and storage (a damaged or foreign file is simply not)."""
        if not output.is_file():
            return False
        try:
            manifest = read_manifest(output)
        except FastKVError:
            return False
        built = manifest.model
        return (
            [(d.name, d.sha256) for d in manifest.documents] == [(doc.name, doc.sha256) for doc in documents]
            and all(getattr(built, key) == value for key, value in model_fingerprint(self.loaded).items())
            and manifest.tokenizer_sha256 == tokenizer_sha256(self.loaded.tokenizer)
            and manifest.method == MethodRecord(plan.method.name, plan.method.parameters())
            and manifest.query_budget == (None if plan.query_budget is None else str(plan.query_budget))
            and manifest.steering_questions == len(plan.questions)
            and (manifest.paused_layer is not None) == plan.query_aware
            and manifest.storage.dtype == plan.storage
            and (manifest.dropped_tokens == 0 or plan.truncate is not None)
        )

    def check_compatible(self, manifest: Manifest, path: str) -> None:
        """Refuse a cache built with another model or tokenizer, naming which."""
        built, here = manifest.model, model_fingerprint(self.loaded)
        different = [key for key, value in here.items() if getattr(built, key) != value]
        if different:
            raise CacheFileError(
                f"{path}: built with model {built.name!r}, which differs from the loaded '{self.loaded.name}' "
                f"({', '.join(different)}); pass --model with the model it was built with"
            )
        if manifest.tokenizer_sha256 != tokenizer_sha256(self.loaded.tokenizer):
            raise CacheFileError(f"{path}: built with a different tokenizer than the loaded model's")

    def load_saved(self, path) -> SavedContext:
        """A saved cache file, checked against this model and loaded (its load timed, for the first answer from it
        to report): what `cache query` and the server answer from. Layer 0 of a query-aware cache is rebuilt from
        its token ids."""
        self.check_compatible(read_manifest(path), str(path))
        start = time.perf_counter()
        cache, manifest = load_cache(path, self.loaded.device, self.loaded.dtype, self.runner)
        return SavedContext(cache, manifest, RunStats(), SharedLoad(time.perf_counter() - start))

    def query(
        self,
        saved: SavedContext,
        question: str,
        budget: Budget | None = None,
        decoding: Decoding = Decoding(),
        on_text: Callable[[str], None] = lambda text: None,
    ) -> Answer:
        """Answer from a fresh copy of a saved context: append the question, re-select, decode. The answer's
        timings are its own; the model's and the cache's loads are in the first answer's stats only."""
        stats, clock = RunStats(), Stopwatch()
        manifest = saved.manifest
        template = PromptTemplate("", "", manifest.template.question_prefix, manifest.template.tail)
        question_ids = encode_question(self.loaded.tokenizer, template, question)
        needed = manifest.context_tokens + len(question_ids) + decoding.max_new_tokens
        if needed > self.loaded.context_window:
            raise ContextOverflowError(
                f"the cached context ({manifest.context_tokens:,} tokens) plus this question and answer need "
                f"{needed:,} tokens, more than the model's window of {self.loaded.context_window:,}"
            )
        stats.tokenize_s = clock.lap()
        cache, logits, selection = self.append_question(saved, question_ids, budget)
        stats.prefill_s = clock.lap()
        stats.context_tokens = cache.seq_len
        self.record_cache(stats, cache)
        text = self.decode(cache, logits, decoding, on_text, stats, clock)
        stats.load_s, stats.cache_load_s = self.model_load.claim(), saved.load.claim()
        documents = [doc.summary() for doc in manifest.documents]
        method = manifest.method
        label = selection.budget_label if selection else method.parameters.get("budget")
        return Answer(question, text, self.loaded.name, method.name, label, documents, stats, logits)

    def append_question(
        self, saved: SavedContext, question_ids: list[int], budget: Budget | None = None
    ) -> tuple[KVCache, torch.Tensor, Method | None]:
        """A fresh copy of the saved context with the question appended and selected by `query_method`
        -> (cache, next-token logits, that method)."""
        cache = saved.cache.clone()
        method = query_method(saved.manifest, budget, len(question_ids))
        return cache, self.runner.extend(cache, self.tensor(question_ids), method), method

    def record_cache(self, stats: RunStats, cache: KVCache) -> None:
        stats.kv_bytes_kept = cache.nbytes
        stats.kv_bytes_full = full_kv_bytes(self.loaded.config, stats.context_tokens, self.loaded.dtype)
        stats.kept_tokens_per_layer = cache.kept_tokens_per_layer

    def decode(self, cache: KVCache, logits, decoding: Decoding, on_text, stats: RunStats, clock: Stopwatch) -> str:
        stream = TextStream(self.loaded.tokenizer, on_text)
        first_token_at: list[float] = []

        def on_token(token: int) -> None:
            if not first_token_at:
                first_token_at.append(time.perf_counter())
            stream.push(token)

        tokens = generate(
            self.runner, cache, logits, decoding.max_new_tokens, self.stop_ids, decoding.sampling, on_token
        )
        stream.close()
        end = time.perf_counter()
        stats.new_tokens = len(tokens)
        stats.ttft_s = (first_token_at[0] if first_token_at else end) - clock.start
        if len(tokens) > 1:
            stats.decode_tokens_per_s = (len(tokens) - 1) / (end - first_token_at[0])
        return stream.text
