"""The Python API over the engine: load a model once, then answer questions about documents."""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from core.documents import Document
from core.generation import Sampling, TextStream, generate, stop_token_ids
from core.kvcache import KVCache, full_kv_bytes
from core.methods import DEFAULT_METHOD, Method, make_method
from core.models import LoadedModel, load_model
from core.progress import Progress, no_progress
from core.prompt import Context, PromptTemplate, encode_context, encode_question, fit_context
from core.runner import Runner
from core.stats import RunStats, Stopwatch


@dataclass
class Answer:
    question: str
    text: str
    model: str
    method: str
    budget: str | None
    documents: list[dict]  # name, sha256, pages, tokens
    stats: RunStats
    tokens: list[int] = field(default_factory=list)

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
    return [
        {"name": doc.name, "sha256": doc.sha256, "pages": doc.pages, "tokens": tokens}
        for doc, tokens in zip(documents, context.tokens_per_document, strict=True)
    ]


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

    def tensor(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.loaded.device)

    def ask(
        self,
        documents: list[Document],
        question: str,
        method: Method | None = None,
        max_new_tokens: int = 256,
        sampling: Sampling = Sampling(),
        truncate: str | None = None,
        on_text: Callable[[str], None] = lambda text: None,
        progress: Progress = no_progress,
    ) -> Answer:
        """Prefill documents + question in one pass and decode the answer.

        The question ends the prompt, so the method's scoring window is the question itself
        (query-aware selection, as in the FastKV paper).
        """
        method = method or make_method(DEFAULT_METHOD)
        stats, clock = RunStats(load_s=self.load_s), Stopwatch()
        tokenizer = self.loaded.tokenizer
        question_ids = encode_question(tokenizer, self.template, question)
        extra = len(question_ids) + max_new_tokens
        window = self.loaded.context_window
        context = fit_context(
            encode_context(tokenizer, self.template, documents), window - extra, window, extra, truncate
        )
        stats.tokenize_s = clock.lap()
        prefill = self.runner.prefill(self.tensor(context.ids + question_ids), method, progress)
        stats.prefill_s = clock.lap()
        stats.context_tokens, stats.dropped_tokens = len(context.ids) + len(question_ids), context.dropped_tokens
        self.record_cache(stats, prefill.cache)
        stats.layer_tokens = prefill.layer_tokens
        text = self.decode(prefill.cache, prefill.logits, max_new_tokens, sampling, on_text, stats, clock)
        summaries = document_summaries(documents, context)
        return Answer(question, text, self.loaded.name, method.name, method.budget_label, summaries, stats)

    def record_cache(self, stats: RunStats, cache: KVCache) -> None:
        stats.kv_bytes_kept = cache.nbytes
        stats.kv_bytes_full = full_kv_bytes(self.loaded.config, stats.context_tokens, self.loaded.dtype)
        stats.kept_tokens_per_layer = cache.kept_tokens_per_layer

    def decode(self, cache, logits, max_new_tokens, sampling, on_text, stats: RunStats, clock: Stopwatch) -> str:
        stream = TextStream(self.loaded.tokenizer, on_text)
        first_token_at: list[float] = []

        def on_token(token: int) -> None:
            if not first_token_at:
                first_token_at.append(time.perf_counter())
            stream.push(token)

        tokens = generate(self.runner, cache, logits, max_new_tokens, self.stop_ids, sampling, on_token)
        end = time.perf_counter()
        stats.new_tokens = len(tokens)
        stats.ttft_s = (first_token_at[0] if first_token_at else end) - clock.start
        if len(tokens) > 1:
            stats.decode_tokens_per_s = (len(tokens) - 1) / (end - first_token_at[0])
        return stream.text
