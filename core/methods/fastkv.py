"""FastKV (Jo et al., arXiv 2502.01068): SnapKV-style GQA-aware cache selection at every layer, plus
Token-Selective Propagation: from `tsp_layer` on, the model runs only on the tokens the window
attends to most (summed over all KV heads), with their original positions."""

from dataclasses import dataclass, field, replace
from typing import ClassVar

from core.errors import InputError
from core.methods.base import Budget, LayerInput
from core.methods.snapkv import SnapKV


@dataclass
class FastKV(SnapKV):
    name: ClassVar[str] = "fastkv"
    propagates: ClassVar[bool] = True
    needs_full_prefill: ClassVar[bool] = False
    tsp_layer: int | None = None  # None: the middle layer, num_layers // 2 - 1
    tsp_rate: Budget = field(default_factory=lambda: Budget(0.2, proportional=True))

    def __post_init__(self):
        super().__post_init__()
        self.tsp_rate = Budget.parse(self.tsp_rate, "--tsp-rate")
        if self.tsp_layer is not None and self.tsp_layer < 0:
            raise InputError(f"--tsp-layer must be >= 0, got {self.tsp_layer}")

    def steered(self, context_len: int, extra: int) -> "FastKV":
        if not extra:
            return self
        propagated = max(self.tsp_rate.tokens(context_len), self.window)
        return replace(super().steered(context_len, extra), tsp_rate=Budget(propagated + extra, proportional=False))

    def tsp_layer_for(self, num_layers: int) -> int:
        layer = num_layers // 2 - 1 if self.tsp_layer is None else self.tsp_layer
        if layer >= num_layers:
            raise InputError(f"--tsp-layer {layer} is past the model's last layer ({num_layers - 1})")
        return max(layer, 0)

    def propagated_count(self, layer: LayerInput) -> int | None:
        if layer.index != self.tsp_layer_for(layer.num_layers):
            return None
        count = max(self.tsp_rate.tokens(layer.context_len), self.window)
        return count if count < layer.present else None
