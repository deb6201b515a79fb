"""Window attention scores shared by SnapKV, FastKV and the TSP step (FastKV, arXiv 2502.01068, §3)."""

import torch
import torch.nn.functional as F
from torch import Tensor

POOLINGS = ("avgpool", "maxpool")


def window_scores(
    q: Tensor, k: Tensor, window: int, pooling: str = "avgpool", kernel: int = 7, valid: Tensor | None = None
) -> Tensor:
    """How much the last `window` queries attend to each earlier key, one row per KV head.

    q: [heads, >= window, d] (its last `window` rows are the window, the last `window` keys are
    theirs), k: [kv_heads, n, d] -> [kv_heads, n - window]. Softmax in fp32 over all keys with a
    causal mask inside the window; sum over the window queries; pool along the keys; sum the
    query heads of each GQA group. `valid` [kv_heads, n]: keys that are empty slots take no
    attention and score -inf, below every real token.
    """
    heads, d = q.shape[0], q.shape[-1]
    kv_heads, n = k.shape[0], k.shape[1]
    group = heads // kv_heads
    q_window = q[:, -window:].float().view(kv_heads, group, window, d)
    logits = q_window @ k.float().unsqueeze(1).transpose(-1, -2) / d**0.5  # [kv_heads, group, window, n]
    future = torch.ones(window, window, dtype=torch.bool, device=q.device).triu(1)
    logits[..., -window:] = logits[..., -window:].masked_fill(future, float("-inf"))
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    attention = logits.softmax(dim=-1)[..., : n - window].sum(dim=-2)  # [kv_heads, group, n - window]
    pool = F.avg_pool1d if pooling == "avgpool" else F.max_pool1d
    pooled = pool(attention.reshape(heads, 1, n - window), kernel_size=kernel, stride=1, padding=kernel // 2)
    scores = pooled.view(kv_heads, group, n - window).sum(dim=1)
    return scores if valid is None else scores.masked_fill(~valid[:, : n - window], float("-inf"))
