"""Token-Selective Propagation (FastKV, arXiv 2502.01068, §3), the steps fastkv and kvzip share: from the TSP
layer on, the model runs only on the selected tokens, with their original positions. A method using it has
`tsp_layer` (None: the middle layer), `tsp_rate` (what propagates) and `budget`, and a scoring window."""

from core.errors import InputError
from core.methods.base import Budget, LayerInput


def check_tsp_layer(tsp_layer: int | None) -> None:
    if tsp_layer is not None and tsp_layer < 0:
        raise InputError(f"--tsp-layer must be >= 0, got {tsp_layer}")


class Propagation:
    """The TSP layer and the count that goes past it, for a method with tsp_layer, tsp_rate and budget."""

    tsp_layer: int | None
    tsp_rate: Budget | None
    budget: Budget

    def tsp_layer_for(self, num_layers: int) -> int | None:
        """The layer after which only the selected tokens run (None: no tsp_rate, nothing propagates)."""
        if self.tsp_rate is None:
            return None
        layer = num_layers // 2 - 1 if self.tsp_layer is None else self.tsp_layer
        if layer >= num_layers:
            raise InputError(f"--tsp-layer {layer} is past the model's last layer ({num_layers - 1})")
        return max(layer, 0)

    def propagated_tokens(self, context_len: int) -> int:
        """Tokens the layers past the TSP layer run on: tsp_rate, or the budget where that is larger
        (deeper layers can cache only what reaches them)."""
        return max(self.tsp_rate.tokens(context_len), self.budget.tokens(context_len), self.scoring_window)

    def propagated_count(self, layer: LayerInput) -> int | None:
        if layer.index != self.tsp_layer_for(layer.num_layers):
            return None
        count = self.propagated_tokens(layer.context_len)
        return count if count < layer.present else None
