"""GemFilter (Shi et al., arXiv 2409.17422): run the first layers, let the last query of
`filter_layer` pick the tokens that matter, then prefill only those again from scratch with fresh
positions 0..n-1 and a full cache."""

from dataclasses import dataclass, field
from typing import ClassVar

import torch.nn.functional as F

from core.errors import InputError
from core.methods.base import (
    BLIND_WINDOW,
    Budget,
    LayerInput,
    Method,
    Selection,
    check_kernel,
    parse_window,
    top_tokens,
)


@dataclass
class GemFilter(Method):
    name: ClassVar[str] = "gemfilter"
    restarts: ClassVar[bool] = True
    budget: Budget = field(default_factory=lambda: Budget(0.1, proportional=True))
    filter_layer: int | None = None  # None: the middle layer, num_layers // 2 - 1
    kernel: int = 5
    window: int = 8  # the prompt's last tokens (question, chat template) always survive the filter

    def __post_init__(self):
        self.budget = Budget.parse(self.budget)
        if self.filter_layer is not None and self.filter_layer < 0:
            raise InputError(f"--filter-layer must be >= 0, got {self.filter_layer}")
        self.window = parse_window(self.window) or BLIND_WINDOW  # it scores with its last query only
        check_kernel(self.kernel)

    def peak_cache_tokens(self, context_len: int, num_layers: int) -> int:
        """The first pass's full layers are still held while the chosen tokens are prefilled again."""
        first_pass = min(self.filter_layer_for(num_layers), num_layers - 1) + 1
        kept = min(max(self.budget.tokens(context_len), self.window), context_len)
        return first_pass * context_len + num_layers * kept

    def filter_layer_for(self, num_layers: int) -> int:
        return max(num_layers // 2 - 1 if self.filter_layer is None else self.filter_layer, 0)

    def select(self, layer: LayerInput) -> Selection:
        filter_layer = self.filter_layer_for(layer.num_layers)
        if filter_layer >= layer.num_layers:
            raise InputError(f"--filter-layer {filter_layer} is past the model's last layer ({layer.num_layers - 1})")
        count = max(self.budget.tokens(layer.context_len), self.window)
        if layer.index != filter_layer or count >= layer.present:
            return Selection()
        heads, kv_heads = layer.q.shape[0], layer.k.shape[0]
        last_query = layer.q[:, -1:].float().view(kv_heads, heads // kv_heads, layer.q.shape[-1])
        inner = (last_query @ layer.k.float().transpose(-1, -2)).sum(dim=(0, 1))  # [present]
        pooled = F.avg_pool1d(inner.view(1, 1, -1), kernel_size=self.kernel, stride=1, padding=self.kernel // 2)[0]
        prefix = pooled[..., : layer.present - self.window]
        return Selection(restart=top_tokens(prefix, count, self.window)[0])
