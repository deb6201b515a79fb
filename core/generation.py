"""Turn next-token logits into an answer: greedy or nucleus sampling, streamed as text."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from core.errors import InputError
from core.kvcache import KVCache
from core.runner import Runner


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise InputError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"--top-p must be in (0, 1], got {self.top_p}")

    def generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator().manual_seed(self.seed)


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 256
    sampling: Sampling = Sampling()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")


def next_token(logits: Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """logits [vocab] -> token id."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / sampling.temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    outside_nucleus = sorted_probs.cumsum(0) - sorted_probs > sampling.top_p
    sorted_probs[outside_nucleus] = 0
    return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])


class TextStream:
    """Incremental detokenization: emits only text that later tokens can no longer change.

    Whitespace at either end of the answer is never emitted, so a streamed answer equals `text`.
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> None:
        self.ids.append(token)
        text = self.text
        if not text.endswith("\ufffd"):  # an unfinished multi-byte character waits for its bytes
            self.on_text(text[self.emitted :])
            self.emitted = len(text)

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()

    def close(self) -> None:
        """Emit what is still held back: an answer may end inside a multi-byte character."""
        text = self.text
        if len(text) > self.emitted:
            self.on_text(text[self.emitted :])
            self.emitted = len(text)


def stop_token_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (model.generation_config.eos_token_id, model.config.eos_token_id, tokenizer.eos_token_id):
        if source is not None:
            ids.update(source if isinstance(source, list) else [source])
    return ids


def generate(
    runner: Runner,
    cache: KVCache,
    logits: Tensor,
    max_new_tokens: int,
    stop_ids: set[int],
    sampling: Sampling = Sampling(),
    on_token: Callable[[int], None] = lambda token: None,
) -> list[int]:
    """Decode from `logits` (the prediction after the cache's last token) until a stop token or the limit.

    Each decoded token is appended to `cache` at position cache.seq_len, the true context length.
    """
    generator, tokens = sampling.generator(), []
    device = next(runner.model.parameters()).device
    while len(tokens) < max_new_tokens:
        token = next_token(logits, sampling, generator)
        if token in stop_ids:
            break
        tokens.append(token)
        on_token(token)
        if len(tokens) < max_new_tokens:
            logits = runner.extend(cache, torch.tensor([token], device=device))
    return tokens
