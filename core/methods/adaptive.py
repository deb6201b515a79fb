"""Head-adaptive budgets (AdaKV, Feng et al., arXiv 2407.11550): a layer's budget is shared across its KV
heads by score, so a head whose window attends sharply keeps fewer tokens and a diffuse one more.

The scores are SnapKV's (attention mass from the window, summed over each GQA group), which sum to the
same total in every head and so compare across heads. Every head keeps at least HEAD_FLOOR of the mean
per-head budget (AdaKV's safeguard) and at most HEAD_CAP times it: heads of different lengths are padded
to the longest in the cache (core/kvcache.py), and the cap bounds that padding.
"""

import math

import torch
from torch import Tensor

from core.kvcache import EMPTY

HEAD_FLOOR = 0.2  # AdaKV's and kvpress's safeguard: every head keeps a fifth of the mean budget
HEAD_CAP = 2.0  # no head keeps more than twice the mean budget: the padded cache holds at most 2x


def widest_head(count: int, window: int, prefix: int) -> int:
    """The most prefix tokens one head may keep when `count` per head (window included) is the mean."""
    return min(math.ceil(HEAD_CAP * max(count - window, 0)), prefix)


def adaptive_top_tokens(scores: Tensor, count: int, window: int) -> Tensor:
    """The layer's best `heads * (count - window)` prefix tokens over all KV heads, each head at least its
    floor and at most its cap, plus every head's last `window`; rows padded with EMPTY at their start.

    scores: [kv_heads, prefix] over the tokens before the window -> [kv_heads, width] token indices.
    """
    heads, prefix = scores.shape
    per_head = max(count - window, 0)
    widest = widest_head(count, window, prefix)
    candidates = scores.topk(widest, dim=-1)  # [kv_heads, widest], each head's best first
    ranked = candidates.values.clone()
    ranked[:, : min(int(HEAD_FLOOR * per_head), widest)] = float("inf")  # the floor is always taken
    taken = torch.zeros(heads * widest, dtype=torch.bool, device=scores.device)
    taken[ranked.flatten().topk(heads * per_head).indices] = True
    taken = taken.view(heads, widest)
    width = int(taken.sum(dim=-1).max())
    chosen = torch.where(taken, candidates.indices, EMPTY).sort(dim=-1).values[:, widest - width :]
    tail = torch.arange(prefix, prefix + window, device=scores.device).expand(heads, -1)
    return torch.cat([chosen, tail], dim=-1)
