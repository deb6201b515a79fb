"""SnapKV (Li et al., arXiv 2404.14469): exact prefill, then per layer and KV head keep the tokens the
last window of queries attends to most, plus the window itself."""

from dataclasses import dataclass, field, replace
from typing import ClassVar

from torch import Tensor

from core.errors import InputError
from core.methods.base import Budget, LayerInput, Method, Selection, top_tokens
from core.methods.scoring import POOLINGS, window_scores


@dataclass
class SnapKV(Method):
    name: ClassVar[str] = "snapkv"
    needs_full_prefill: ClassVar[bool] = True
    budget: Budget = field(default_factory=lambda: Budget(0.1, proportional=True))
    window: int = 8
    kernel: int = 7
    pooling: str = "maxpool"

    def __post_init__(self):
        self.budget = Budget.parse(self.budget)
        if self.window < 1:
            raise InputError(f"--window must be at least 1, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise InputError(f"the pooling kernel must be odd and positive, got {self.kernel}")
        if self.pooling not in POOLINGS:
            raise InputError(f"--pooling must be one of {', '.join(POOLINGS)}, got '{self.pooling}'")

    def steered(self, context_len: int, extra: int) -> "SnapKV":
        if not extra:
            return self
        kept = max(self.budget.tokens(context_len), self.window)
        return replace(self, window=extra, budget=Budget(kept + extra, proportional=False))

    def kept_count(self, layer: LayerInput) -> int | None:
        """Tokens this layer caches per KV head; None when everything fits the budget."""
        count = max(self.budget.tokens(layer.context_len), self.window)
        return count if count < layer.present else None

    def propagated_count(self, layer: LayerInput) -> int | None:
        return None

    def scores(self, layer: LayerInput) -> Tensor:
        return window_scores(layer.q, layer.k, self.window, self.pooling, self.kernel)

    def select(self, layer: LayerInput) -> Selection:
        kept, propagated = self.kept_count(layer), self.propagated_count(layer)
        if kept is None and propagated is None:
            return Selection()
        scores = self.scores(layer)  # [kv_heads, present - window]
        return Selection(
            keep=None if kept is None else top_tokens(scores, kept, self.window),
            propagate=None
            if propagated is None
            else top_tokens(scores.sum(0, keepdim=True), propagated, self.window)[0],
        )
