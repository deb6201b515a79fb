"""The interface every token-selection method implements, and the budgets they share.

A method looks at one layer at a time during prefill and answers, from that layer's queries and
keys: which tokens enter the cache (per KV head), which tokens go on to the next layer (Token-
Selective Propagation), or which tokens to prefill again from scratch (GemFilter). The runner asks;
it never branches on a method's type.
"""

import re
from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

import torch
from torch import Tensor

from core.errors import InputError


@dataclass(frozen=True)
class Budget:
    """A token count per layer: a share of the context (`10%`, `0.1`), a constant (`1024`), or a share
    with a floor (`25%,2048`: a quarter of the context, at least 2048 tokens; the paper counts tokens,
    and a share of a short document is very few)."""

    value: float
    proportional: bool
    floor: int = 0  # tokens; only with a share

    @classmethod
    def parse(cls, text: "str | Budget", option: str = "--budget") -> "Budget":
        if isinstance(text, Budget):
            return text
        text = str(text).strip()
        share, comma, floor = text.partition(",")
        if comma:
            budget = cls.parse(share, option)
            if not (budget.proportional and re.fullmatch(r"\d+", floor.strip()) and int(floor) >= 1):
                raise InputError(f"{option} takes a share and a floor as 25%,2048, got '{text}'")
            return cls(budget.value, proportional=True, floor=int(floor))
        if match := re.fullmatch(r"(\d+(?:\.\d+)?)%", text):
            fraction = float(match[1]) / 100
        elif re.fullmatch(r"\d+", text):
            if int(text) < 1:
                raise InputError(f"{option} must be at least 1 token, got {text}")
            return cls(int(text), proportional=False)
        elif re.fullmatch(r"\d*\.\d+", text):
            fraction = float(text)
        else:
            raise InputError(
                f"{option} takes a percentage (10%), a fraction (0.1), a token count (1024) or a percentage "
                f"with a floor (25%,2048), got '{text}'"
            )
        if not 0 < fraction <= 1:
            raise InputError(f"{option} must be more than 0% and at most 100%, got '{text}'")
        return cls(fraction, proportional=True)

    def tokens(self, context_len: int) -> int:
        if not self.proportional:
            return int(self.value)
        # round first: 0.29 * 100 is 28.999999999999996 in floating point
        return max(int(round(context_len * self.value, 6)), self.floor)

    def __str__(self) -> str:
        if not self.proportional:
            return str(int(self.value))
        return f"{self.value * 100:g}%" + (f",{self.floor}" if self.floor else "")


@dataclass(frozen=True)
class LayerInput:
    """What a method sees of one prefill layer."""

    index: int
    num_layers: int
    context_len: int  # tokens of the whole prompt, whatever this layer still sees
    q: Tensor  # [heads, n, head_dim], after RoPE
    k: Tensor  # [kv_heads, n, head_dim], after RoPE
    valid: Tensor | None = None  # [kv_heads, n] bool: False at a head-adaptive cache's empty slots
    reconstruction: Tensor | None = None  # [kv_heads, n] float32: the probes' scores (core/reconstruction.py)

    @property
    def present(self) -> int:
        return self.k.shape[1]


@dataclass(frozen=True)
class Selection:
    """A method's answer for one layer; None everywhere means: keep everything, change nothing."""

    keep: Tensor | None = None  # [kv_heads, m] sorted token indices entering this layer's cache; EMPTY pads a row
    propagate: Tensor | None = None  # [m'] sorted token indices the next layers run on (TSP)
    restart: Tensor | None = None  # [m''] sorted token ids to prefill again with fresh positions
    pause: bool = False  # stop the prefill after this layer, holding every token's hidden state
    hold_queries: int = 0  # keep this layer's last queries with a paused prefill, for its resume to score with
    deferred: Tensor | None = None  # scores for a selection over every layer at once (Method.select_deferred)


def top_tokens(scores: Tensor, count: int, window: int) -> Tensor:
    """Per row, the `count - window` best-scored prefix tokens plus the `window` last, sorted.

    scores: [rows, prefix] over the tokens before the window -> [rows, count] token indices.
    """
    rows, prefix = scores.shape
    chosen = scores.topk(max(count - window, 0), dim=-1).indices.sort(dim=-1).values
    tail = torch.arange(prefix, prefix + window, device=scores.device).expand(rows, -1)
    return torch.cat([chosen, tail], dim=-1)


@dataclass
class Method:
    """Full KV by default: every token of every layer is cached, nothing is dropped."""

    name: ClassVar[str] = "base"
    propagates: ClassVar[bool] = False  # deeper layers may run on fewer tokens
    needs_full_prefill: ClassVar[bool] = False  # compresses only after an exact prefill
    restarts: ClassVar[bool] = False  # prefills a token subset again with new positions
    selects_by_question: ClassVar[bool] = True  # a query-aware saved cache can leave the selection to each question
    reconstructs: ClassVar[bool] = False  # scores with reconstruction probes (core/reconstruction.py)

    def select(self, layer: LayerInput) -> Selection:
        return Selection()

    def peak_cache_tokens(self, context_len: int, num_layers: int) -> int:
        """Cache entries per KV head, summed over layers, held at the prefill's peak (memory estimate)."""
        return context_len * num_layers

    def held_tokens(self, context_len: int) -> int:
        """Tokens whose hidden states the prefill holds when it pauses (memory estimate)."""
        return 0

    def reconstruction_depth(self, context_len: int, num_layers: int) -> int:
        """How many first layers the reconstruction probes run through (0: the method uses none)."""
        return 0

    def select_deferred(self, scores: list[Tensor], context_len: int) -> list[Tensor]:
        """Each layer's `keep`, from the scores every layer deferred: a budget over the whole cache."""
        raise NotImplementedError

    def pause_layer(self, num_layers: int) -> int | None:
        """Where a query-aware saved cache pauses: the last layer whose work does not depend on the
        question (None: every layer's does, so there is nothing to save)."""
        return None

    def resolved(self, context_len: int, num_layers: int) -> dict:
        """The policy in tokens for a prompt of `context_len` tokens (the manifest and `cache info` show it)."""
        return {"budget_tokens": context_len}

    def for_question(self, question_tokens: int | None) -> "Method":
        """This method for a prompt ending with a question of `question_tokens` tokens (None: a build
        that has no question): a window that is the question takes its length."""
        return self

    def steered(self, context_len: int, extra: int) -> "Method":
        """This method for a prompt of `context_len` tokens followed by `extra` steering tokens
        that act as the scoring window and are dropped afterwards (their count comes on top of
        every budget)."""
        return self

    @property
    def budget_label(self) -> str | None:
        budget = getattr(self, "budget", None)
        return None if budget is None else str(budget)

    def parameters(self) -> dict:
        """The method's settings as JSON-ready values (budgets as their CLI spelling)."""
        values = {item.name: getattr(self, item.name) for item in fields(self)}
        return {key: str(value) if isinstance(value, Budget) else value for key, value in values.items()}


@dataclass
class PauseAfter(Method):
    """Caches every token up to `layer`, then pauses the prefill there, holding each token's hidden
    state: a query-aware saved cache, which each question resumes with the method it was built for."""

    name: ClassVar[str] = "pause"
    layer: int = 0
    # The resumed method's scoring window: a question shorter than it scores with the last context
    # tokens too, as in `ask`, so each layer up to the pause keeps that many of its last queries.
    window: int = 0

    def select(self, layer: LayerInput) -> Selection:
        return Selection(pause=layer.index == self.layer, hold_queries=self.window if layer.index <= self.layer else 0)

    def peak_cache_tokens(self, context_len: int, num_layers: int) -> int:
        return context_len * min(self.layer + 1, num_layers)

    def held_tokens(self, context_len: int) -> int:
        return context_len


QUESTION_WINDOW = "question"
BLIND_WINDOW = 8  # what a question window scores with where there is no question: the prompt's last tokens


def parse_window(window: "int | str | None") -> int | None:
    """--window: a number of last queries, or `question` (None): every token of the question, with the
    chat template's tail after it."""
    if window is None or window == QUESTION_WINDOW:
        return None
    if isinstance(window, str):
        if not re.fullmatch(r"\s*\d+\s*", window):
            raise InputError(f"--window takes a number of tokens or '{QUESTION_WINDOW}', got '{window}'")
        window = int(window)
    if window < 1:
        raise InputError(f"--window must be at least 1, got {window}")
    return window


def check_kernel(kernel: int) -> None:
    if kernel < 1 or kernel % 2 == 0:
        raise InputError(f"the pooling kernel must be odd and positive, got {kernel}")


@dataclass
class ScoredMethod(Method):
    """Per layer and KV head, keep the `budget` best-scored tokens, the last `window` among them.

    `window` None scores with the question's tokens, however many (`for_question` resolves it).
    Subclasses only say how tokens score (`scores`) and, optionally, how many propagate.
    """

    budget: Budget = field(default_factory=lambda: Budget(0.1, proportional=True))
    window: int | None = None  # the question's tokens (QUESTION_WINDOW)

    def __post_init__(self):
        self.budget = Budget.parse(self.budget)
        self.window = parse_window(self.window)

    def resolved(self, context_len: int, num_layers: int) -> dict:
        kept = min(max(self.budget.tokens(context_len), self.window or 0), context_len)
        return {"budget_tokens": kept, "window": self.window}  # window None: each question's tokens

    @property
    def scoring_window(self) -> int:
        """The window in tokens: a question window not resolved for a question (a prompt without one, as in
        the runner's own tests and benchmarks) scores with the prompt's last BLIND_WINDOW tokens."""
        return BLIND_WINDOW if self.window is None else self.window

    def parameters(self) -> dict:
        return {**super().parameters(), "window": QUESTION_WINDOW if self.window is None else self.window}

    def for_question(self, question_tokens: int | None) -> "ScoredMethod":
        if self.window is not None:
            return self
        return replace(self, window=question_tokens or BLIND_WINDOW)

    def scores(self, layer: LayerInput) -> Tensor:
        """[kv_heads, present - window]: higher is kept first."""
        raise NotImplementedError

    def steered(self, context_len: int, extra: int) -> "ScoredMethod":
        if not extra:
            return self
        kept = self.budget_tokens(context_len)
        return replace(self, window=extra, budget=Budget(kept + extra, proportional=False))

    def budget_tokens(self, context_len: int) -> int:
        """Tokens a layer caches per KV head (the window always among them), before capping at the context."""
        return max(self.budget.tokens(context_len), self.scoring_window)

    def peak_cache_tokens(self, context_len: int, num_layers: int) -> int:
        return min(self.budget_tokens(context_len), context_len) * num_layers

    def kept_count(self, layer: LayerInput) -> int | None:
        """Tokens this layer caches per KV head; None when everything fits the budget."""
        count = self.budget_tokens(layer.context_len)
        return count if count < layer.present else None

    def propagated_count(self, layer: LayerInput) -> int | None:
        return None

    def select(self, layer: LayerInput) -> Selection:
        if (
            layer.q.shape[1] < self.scoring_window
        ):  # fewer queries than the window (an appended question): score with those
            return replace(self, window=layer.q.shape[1]).select(layer)
        kept, propagated = self.kept_count(layer), self.propagated_count(layer)
        if kept is None and propagated is None:
            return Selection()
        scores = self.scores(layer)  # [kv_heads, present - window]
        return Selection(
            keep=None if kept is None else self.keep_tokens(scores, kept),
            propagate=None
            if propagated is None
            else top_tokens(self.propagation_scores(layer, scores), propagated, self.scoring_window)[0],
        )

    def keep_tokens(self, scores: Tensor, count: int) -> Tensor:
        """[kv_heads, count]: what each KV head caches, given its scores [kv_heads, present - window]."""
        return top_tokens(scores, count, self.scoring_window)

    def propagation_scores(self, layer: LayerInput, scores: Tensor) -> Tensor:
        """[1, present - window]: one ranking shared by every head for the tokens deeper layers run on."""
        return scores.sum(0, keepdim=True)
