"""FastKV (Jo et al., arXiv 2502.01068): SnapKV-style GQA-aware cache selection at every layer, plus
Token-Selective Propagation: from `tsp_layer` on, the model runs only on the tokens the window
attends to most (summed over all KV heads), with their original positions."""

from dataclasses import dataclass, field, replace
from typing import ClassVar

from torch import Tensor

from core.methods.base import Budget, LayerInput, check_kernel
from core.methods.scoring import window_scores
from core.methods.snapkv import SnapKV
from core.methods.tsp import Propagation, check_tsp_layer


@dataclass
class FastKV(Propagation, SnapKV):
    name: ClassVar[str] = "fastkv"
    propagates: ClassVar[bool] = True
    needs_full_prefill: ClassVar[bool] = False
    # The default policy, chosen on the tuning half of bench/sweep.py (docs/benchmarks.md): a 30% share with a
    # 2048-token floor, the paper's count, for the cache and, being above tsp_rate, for what TSP propagates.
    budget: Budget = field(default_factory=lambda: Budget(0.3, proportional=True, floor=2048))
    tsp_layer: int | None = None  # None: the middle layer, num_layers // 2 - 1
    tsp_rate: Budget = field(default_factory=lambda: Budget(0.2, proportional=True))
    # Pooling width of the TSP ranking. Deeper layers see nothing TSP drops, so it pools wider than the
    # per-layer cache selection to carry whole spans: with the paper's 7, SmolLM2-135M lost digits of
    # passkeys the window attended to (docs/benchmarks.md, accuracy).
    tsp_kernel: int = 31

    def __post_init__(self):
        super().__post_init__()
        self.tsp_rate = Budget.parse(self.tsp_rate, "--tsp-rate")
        check_kernel(self.tsp_kernel)
        check_tsp_layer(self.tsp_layer)

    def resolved(self, context_len: int, num_layers: int) -> dict:
        propagated = min(max(self.tsp_rate.tokens(context_len), self.budget.tokens(context_len)), context_len)
        tsp = {"tsp_layer": self.tsp_layer_for(num_layers), "propagated_tokens": propagated}
        return {**super().resolved(context_len, num_layers), **tsp}

    def steered(self, context_len: int, extra: int) -> "FastKV":
        if not extra:
            return self
        propagated = self.propagated_tokens(context_len) + extra
        return replace(super().steered(context_len, extra), tsp_rate=Budget(propagated, proportional=False))

    def pause_layer(self, num_layers: int) -> int:
        return self.tsp_layer_for(num_layers)  # up to here every token runs, whatever the question

    def propagation_scores(self, layer: LayerInput, scores: Tensor) -> Tensor:
        if self.tsp_kernel == self.kernel:
            return super().propagation_scores(layer, scores)
        scores = window_scores(layer.q, layer.k, self.scoring_window, self.pooling, self.tsp_kernel, layer.valid)
        return scores.sum(0, keepdim=True)
