"""Revival: a question brings back the tokens a question-blind build's TSP dropped, if it needs them.

A saved cache is built before its questions are known, so Token-Selective Propagation ranks by the
document's own last tokens and the deeper layers never see the rest: whatever a later question needs
from there is gone (on Qwen2.5-0.5B, whole passkeys were). A two-stage build keeps those tokens'
hidden states as they left the TSP layer (HeldTokens). At query time, at the first deeper layer, the
question ranks every context position the way `ask`'s TSP ranks them, with its own queries; the held
tokens in the top `count` then run through the deeper layers beside the question, attending to what
the cache holds there, and enter its caches. Tokens the build already propagated cost nothing, so
a query pays only for what the build's window missed.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from core.methods.scoring import pooled, window_attention


@dataclass(frozen=True)
class Revival:
    count: int  # context tokens the question's ranking lets through to the deeper layers
    pooling: str
    kernel: int  # pooling width along the positions, as the build's TSP ranking

    def ranked(self, q: Tensor, keys: Tensor, positions: Tensor, context_len: int) -> Tensor:
        """The context positions the question ranks in its top `count`, sorted.

        q: [heads, w, d] the question's queries; keys [kv_heads, n + w, d]: context keys, then the
        question's w keys; positions [kv_heads, n] of the context keys, each position at most once
        per head. Attention is scattered to its positions before pooling, so neighbours pool together
        whichever part of the cache they came from; positions no key covers score 0.
        """
        attention = window_attention(q, keys, q.shape[1])  # [kv_heads, group, n]
        group = attention.shape[1]
        by_position = attention.new_zeros(attention.shape[0], group, context_len)
        by_position.scatter_(2, positions.unsqueeze(1).expand(-1, group, -1), attention)
        ranking = pooled(by_position, self.pooling, self.kernel).sum(dim=1).sum(dim=0)  # as window_scores
        return ranking.topk(min(self.count, context_len)).indices.sort().values

    def chosen(self, q: Tensor, keys: Tensor, positions: Tensor, held_positions: Tensor, context_len: int) -> Tensor:
        """Indices into the held tokens (sorted) of those the question ranks in its top `count`."""
        return torch.isin(held_positions, self.ranked(q, keys, positions, context_len)).nonzero().squeeze(1)
