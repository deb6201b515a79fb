"""StreamingLLM (Xiao et al., arXiv 2309.17453): keep a few attention-sink tokens at the start and
the most recent tokens; no scores at all."""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from core.methods.base import LayerInput, ScoredMethod


@dataclass
class StreamingLLM(ScoredMethod):
    name: ClassVar[str] = "streamingllm"
    needs_full_prefill: ClassVar[bool] = True
    sinks: int = 4

    def scores(self, layer: LayerInput) -> Tensor:
        """Recency as the score, sinks above it (the first sink highest): top-k then takes the
        sinks and the latest tokens, and the earliest sinks when there is room for fewer."""
        prefix = layer.present - self.scoring_window
        recency = torch.arange(prefix, device=layer.k.device, dtype=torch.float32)
        sinks = min(self.sinks, prefix)
        recency[:sinks] = prefix + torch.arange(sinks, 0, -1, device=layer.k.device, dtype=torch.float32)
        return recency.expand(layer.k.shape[0], -1)
