"""SnapKV (Li et al., arXiv 2404.14469): exact prefill, then per layer and KV head keep the tokens the
last window of queries attends to most, plus the window itself."""

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from core.errors import InputError
from core.methods.adaptive import adaptive_top_tokens, widest_head
from core.methods.base import LayerInput, ScoredMethod, check_kernel
from core.methods.scoring import POOLINGS, window_scores

HEAD_BUDGETS = ("uniform", "adaptive")


@dataclass
class SnapKV(ScoredMethod):
    name: ClassVar[str] = "snapkv"
    needs_full_prefill: ClassVar[bool] = True
    kernel: int = 7
    pooling: str = "maxpool"
    head_budget: str = "uniform"  # or "adaptive": the layer's budget shared across KV heads by score (AdaKV)

    def __post_init__(self):
        super().__post_init__()
        check_kernel(self.kernel)
        if self.pooling not in POOLINGS:
            raise InputError(f"--pooling must be one of {', '.join(POOLINGS)}, got '{self.pooling}'")
        if self.head_budget not in HEAD_BUDGETS:
            raise InputError(f"--head-budget must be one of {', '.join(HEAD_BUDGETS)}, got '{self.head_budget}'")

    @property
    def adaptive(self) -> bool:
        return self.head_budget == "adaptive"

    def keep_tokens(self, scores: Tensor, count: int) -> Tensor:
        if not self.adaptive:
            return super().keep_tokens(scores, count)
        return adaptive_top_tokens(scores, count, self.scoring_window)

    def peak_cache_tokens(self, context_len: int, num_layers: int) -> int:
        if not self.adaptive:
            return super().peak_cache_tokens(context_len, num_layers)
        count, window = self.budget_tokens(context_len), self.scoring_window
        return min(window + widest_head(count, window, context_len - window), context_len) * num_layers

    def scores(self, layer: LayerInput) -> Tensor:
        return window_scores(layer.q, layer.k, self.scoring_window, self.pooling, self.kernel, layer.valid)
