"""The Python API over the engine: load a model once, then answer questions about documents."""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property

import torch

from core import __version__ as FASTKV_VERSION
from core.documents import Document, TokenLimit
from core.errors import CacheFileError, ContextOverflowError, InputError
from core.generation import Decoding, TextStream, generate, stop_token_ids
from core.kvcache import KVCache, full_kv_bytes
from core.memory import MemoryGuard
from core.methods import DEFAULT_METHOD, Budget, Method, PauseAfter, make_method
from core.methods.snapkv import SnapKV
from core.models import LoadedModel, load_model, model_fingerprint, tokenizer_sha256
from core.progress import Progress, no_progress
from core.prompt import Context, PromptTemplate, check_truncate, encode_context, encode_question, fit_context
from core.runner import Runner
from core.stats import RunStats, Stopwatch
from core.store import check_cache_dtype, load_cache, quantization_for, read_manifest

QUESTION_RESERVE = 256  # tokens a saved context leaves free in the window for a question and its answer


@dataclass
class SavedContext:
    """A prefilled context without its question: what `cache build` saves and `cache query` loads."""

    cache: KVCache
    manifest: dict
    stats: RunStats


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


def document_summaries(documents: list[Document], context: Context) -> list[dict]:
    """Per document: name, sha256, pages, the tokens in the context and how many pages have some there."""
    return [
        {"name": doc.name, "sha256": doc.sha256, "pages": doc.pages, "tokens": tokens, "pages_used": used}
        for doc, tokens, used in zip(documents, context.tokens_per_document, pages_used(context), strict=True)
    ]


def pages_used(context: Context) -> list[int]:
    return [sum(end > start for start, end in pages) for pages in context.page_token_spans]


def manifest_pages_used(manifest: dict) -> list[int]:
    return [sum(end > start for start, end in doc["page_token_spans"]) for doc in manifest["documents"]]


def query_method(manifest: dict, budget: Budget | None, question_tokens: int) -> Method | None:
    """How a query selects from a saved context. A query-aware (paused) cache: the method it was built
    with, at `budget` if given, exactly as `ask` runs it. Otherwise two-stage selection: the question's
    own tokens score the stored ones and keep `budget` (default: the file's query budget); None when
    answers should use every stored token."""
    method, parameters = manifest["method"]["name"], manifest["method"]["parameters"]
    if manifest["paused_layer"] is not None:
        return make_method(method, **{**parameters, "budget": budget or parameters["budget"]}).for_question(
            question_tokens
        )
    if budget is None and manifest["query_budget"] is not None:
        budget = Budget.parse(manifest["query_budget"])
    if budget is None:
        return None
    return SnapKV(budget, window=question_tokens, pooling=parameters.get("pooling", "maxpool"))


def cache_kind(manifest: dict) -> str:
    """query-aware (a paused prefill), two-stage (queries re-select) or one-stage (answers use what is stored)."""
    if manifest["paused_layer"] is not None:
        return "query-aware"
    return "one-stage" if manifest["query_budget"] is None else "two-stage"


def fullkv_file_bytes(model: dict, tokens: int) -> int:
    """The tensor bytes of a float16 cache of every token: the yardstick a saved file's size is read against."""
    per_token = model["num_layers"] * model["num_kv_heads"] * (2 * model["head_dim"] * 2 + 4)  # K, V, position
    return per_token * tokens


def build_summary(saved: SavedContext, output: str, file_bytes: int, save_s: float, cache_dtype: str) -> dict:
    """What `cache build --json` prints: the stable keys output/file_bytes/save_s, the kind of cache, its
    storage and its size against a float16 cache of every token, then the run's stats."""
    manifest = saved.manifest
    full = fullkv_file_bytes(manifest["model"], manifest["context_tokens"])
    return {
        "output": output,
        "file_bytes": file_bytes,
        "save_s": save_s,
        "model": manifest["model"]["name"],
        "method": manifest["method"]["name"],
        "budget": manifest["method"]["parameters"].get("budget"),
        "kind": cache_kind(manifest),
        "query_budget": manifest["query_budget"],
        "paused_layer": manifest["paused_layer"],
        "cache_dtype": cache_dtype,
        "quantization": quantization_for(cache_dtype, manifest["model"], manifest["paused_layer"]),
        "fullkv_float16_bytes": full,
        "file_share_of_fullkv_float16": file_bytes / full,
        **saved.stats.to_dict(),
    }


def check_query_aware(method: Method, query_budget: Budget | None, questions: list[str]) -> None:
    """A query-aware build pauses where the method starts selecting by the question: fastkv's TSP layer."""
    if not method.propagates:
        raise InputError(f"--query-aware pauses at fastkv's TSP layer; --method {method.name} has none")
    if questions or query_budget is not None:
        given = "--questions" if questions else "--query-budget"
        raise InputError(f"{given} does not apply to --query-aware: each question selects for itself")


def resolve_query_aware(method: Method, query_budget: Budget | None, questions: list[str], asked: bool | None) -> bool:
    """Whether a build pauses for each question to resume it (query-aware). Unsaid (None, `cache build`'s
    default) it is query-aware wherever it can be, since its answers are `ask`'s: question-blind for a
    method with no TSP layer, or when --query-budget or --questions select without each question."""
    if asked is None:
        return method.propagates and query_budget is None and not questions
    if asked:
        check_query_aware(method, query_budget, questions)
    return asked


def memory_room(guard: MemoryGuard | None, truncate: str | None, method: Method, extra: int, **kw) -> int | None:
    """How many context tokens memory allows, for truncation to honour (None: no limit to apply;
    when not even `extra` prompt tokens fit, the guard's own check explains it)."""
    if guard is None or truncate is None:
        return None
    most = guard.most_tokens(method, **kw) - extra
    return most if most > 0 else None


class Engine:
    """A loaded model with its runner and prompt template; reused for every question in a process."""

    def __init__(self, loaded: LoadedModel, load_s: float | None = None):
        self.loaded = loaded
        self.load_s = load_s
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
        stats, clock = RunStats(load_s=self.load_s), Stopwatch()
        question_ids = encode_question(self.loaded.tokenizer, self.template, question)
        method = (method or make_method(DEFAULT_METHOD)).for_question(len(question_ids))
        guard = None if ignore_memory else MemoryGuard.for_model(self.loaded.model)
        new_tokens, extra = decoding.max_new_tokens, len(question_ids)
        most = memory_room(guard, truncate, method, extra, new_tokens=new_tokens)
        context = self.context(documents, extra + new_tokens, truncate, most)
        if guard:
            guard.check(len(context.ids) + extra, method, new_tokens, truncating=truncate is not None)
        stats.tokenize_s = clock.lap()
        prefill = self.runner.prefill(self.tensor(context.ids + question_ids), method, progress)
        stats.prefill_s = clock.lap()
        stats.context_tokens, stats.dropped_tokens = len(context.ids) + len(question_ids), context.dropped_tokens
        stats.dropped_tokens_estimated = context.dropped_estimated
        stats.layer_tokens = prefill.layer_tokens
        self.record_cache(stats, prefill.cache)
        text = self.decode(prefill.cache, prefill.logits, decoding, on_text, stats, clock)
        summaries = document_summaries(documents, context)
        return Answer(
            question, text, self.loaded.name, method.name, method.budget_label, summaries, stats, prefill.logits
        )

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
        method: Method,
        query_budget: Budget | None,
        questions: list[str] = (),
        truncate: str | None = None,
        reserved: int = QUESTION_RESERVE,
        progress: Progress = no_progress,
        cache_dtype: str = "float16",
        ignore_memory: bool = False,
        query_aware: bool = False,
    ) -> SavedContext:
        """Prefill the documents without knowing the question, for a cache to save and query later.

        With `questions`, they are appended for the prefill so their tokens are the scoring window
        (they steer selection), then dropped from the cache. `query_budget` is what each query
        re-selects the stored tokens down to, with its own question as the window (two-stage).
        `query_aware`: pause the prefill at the layer from which `method` selects by the question
        (fastkv's TSP layer), caching every token up to there; each query resumes it with `method`
        and its own question, so it answers exactly as `ask` (a larger file, a longer query).
        Memory is checked as in `ask`, including saving the cache in `cache_dtype`.
        """
        if method.restarts:
            raise InputError(
                f"--method {method.name} re-prefills with new positions; a saved cache needs original positions"
            )
        if query_aware:
            check_query_aware(method, query_budget, questions)
        else:  # a query-aware cache keeps a question window for each question to resolve
            method = method.for_question(None)
        pause = method.pause_layer(self.runner.num_layers) if query_aware else None
        stats, clock = RunStats(load_s=self.load_s), Stopwatch()
        steering = [t for q in questions for t in encode_question(self.loaded.tokenizer, self.template, q)]
        guard = None if ignore_memory else MemoryGuard.for_model(self.loaded.model)
        check_cache_dtype(cache_dtype, pause is not None)
        prefilled = method if pause is None else PauseAfter(pause, window=method.window or 0)
        most = memory_room(guard, truncate, prefilled, len(steering), saved_dtype=cache_dtype)
        context = self.context(documents, min(reserved, self.loaded.context_window // 4), truncate, most)
        selection = prefilled.steered(len(context.ids), len(steering))
        if guard:
            tokens = len(context.ids) + len(steering)
            guard.check(tokens, selection, saved_dtype=cache_dtype, truncating=truncate is not None)
        stats.tokenize_s = clock.lap()
        prefill = self.runner.prefill(self.tensor(context.ids + steering), selection, progress)
        cache = prefill.cache.without_last(len(steering))
        stats.prefill_s = clock.lap()
        stats.context_tokens, stats.dropped_tokens, stats.layer_tokens = (
            len(context.ids),
            context.dropped_tokens,
            prefill.layer_tokens,
        )
        stats.dropped_tokens_estimated = context.dropped_estimated
        self.record_cache(stats, cache)
        manifest = {
            "fastkv_version": FASTKV_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": {"name": self.loaded.name, "spec": self.loaded.spec, **model_fingerprint(self.loaded)},
            "tokenizer_sha256": tokenizer_sha256(self.loaded.tokenizer),
            "method": {"name": method.name, "parameters": method.parameters()},
            "query_budget": None if query_budget is None else str(query_budget),
            "steering_questions": len(questions),
            "paused_layer": pause,
            "policy": method.resolved(len(context.ids), self.runner.num_layers),
            "context_tokens": len(context.ids),
            "dropped_tokens": context.dropped_tokens,
            "template": {"question_prefix": self.template.question_prefix, "tail": self.template.tail},
            "documents": [
                {**summary, "size": doc.size, "page_token_spans": spans}
                for doc, summary, spans in zip(
                    documents, document_summaries(documents, context), context.page_token_spans, strict=True
                )
            ],
        }
        return SavedContext(cache, manifest, stats)

    def check_compatible(self, manifest: dict, path: str) -> None:
        """Refuse a cache built with another model or tokenizer, naming which."""
        built, here = manifest["model"], model_fingerprint(self.loaded)
        different = [key for key, value in here.items() if built.get(key) != value]
        if different:
            raise CacheFileError(
                f"{path}: built with model {built['name']!r}, which differs from the loaded '{self.loaded.name}' "
                f"({', '.join(different)}); pass --model with the model it was built with"
            )
        if manifest["tokenizer_sha256"] != tokenizer_sha256(self.loaded.tokenizer):
            raise CacheFileError(f"{path}: built with a different tokenizer than the loaded model's")

    def load_saved(self, path) -> SavedContext:
        """A saved cache file, checked against this model and loaded (its load timed): what `cache query` and the
        server answer from. Layer 0 of a query-aware cache is rebuilt from its token ids."""
        self.check_compatible(read_manifest(path), str(path))
        start = time.perf_counter()
        cache, manifest = load_cache(path, self.loaded.device, self.loaded.dtype, self.runner)
        return SavedContext(cache, manifest, RunStats(cache_load_s=time.perf_counter() - start))

    def query(
        self,
        saved: SavedContext,
        question: str,
        budget: Budget | None = None,
        decoding: Decoding = Decoding(),
        on_text: Callable[[str], None] = lambda text: None,
    ) -> Answer:
        """Answer from a fresh copy of a saved context: append the question, re-select, decode."""
        stats, clock = RunStats(load_s=self.load_s, cache_load_s=saved.stats.cache_load_s), Stopwatch()
        manifest = saved.manifest
        template = PromptTemplate("", "", manifest["template"]["question_prefix"], manifest["template"]["tail"])
        question_ids = encode_question(self.loaded.tokenizer, template, question)
        needed = manifest["context_tokens"] + len(question_ids) + decoding.max_new_tokens
        if needed > self.loaded.context_window:
            raise ContextOverflowError(
                f"the cached context ({manifest['context_tokens']:,} tokens) plus this question and answer need "
                f"{needed:,} tokens, more than the model's window of {self.loaded.context_window:,}"
            )
        stats.tokenize_s = clock.lap()
        cache, logits, selection = self.append_question(saved, question_ids, budget)
        stats.prefill_s = clock.lap()
        stats.context_tokens = cache.seq_len
        self.record_cache(stats, cache)
        text = self.decode(cache, logits, decoding, on_text, stats, clock)
        stats.ttft_s += stats.cache_load_s or 0.0
        documents = [
            {**{key: doc[key] for key in ("name", "sha256", "pages", "tokens")}, "pages_used": used}
            for doc, used in zip(manifest["documents"], manifest_pages_used(manifest), strict=True)
        ]
        method = manifest["method"]
        label = selection.budget_label if selection else method["parameters"].get("budget")
        return Answer(question, text, self.loaded.name, method["name"], label, documents, stats, logits)

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
