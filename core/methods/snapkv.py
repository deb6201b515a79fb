"""SnapKV (Li et al., arXiv 2404.14469): exact prefill, then per layer and KV head keep the tokens the
last window of queries attends to most, plus the window itself."""

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from core.errors import InputError
from core.methods.base import LayerInput, ScoredMethod, check_kernel
from core.methods.scoring import POOLINGS, window_scores


@dataclass
class SnapKV(ScoredMethod):
    name: ClassVar[str] = "snapkv"
    needs_full_prefill: ClassVar[bool] = True
    kernel: int = 7
    pooling: str = "maxpool"

    def __post_init__(self):
        super().__post_init__()
        check_kernel(self.kernel)
        if self.pooling not in POOLINGS:
            raise InputError(f"--pooling must be one of {', '.join(POOLINGS)}, got '{self.pooling}'")

    def scores(self, layer: LayerInput) -> Tensor:
        return window_scores(layer.q, layer.k, self.scoring_window, self.pooling, self.kernel)
