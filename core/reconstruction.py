"""Reconstruction probes (KVzip, Kim et al., arXiv 2505.23416): after the context, the model is asked to
repeat it, one chunk at a time, and each cached key scores by the most attention any repeating query gives
it. The score says how much the model needs a pair to reproduce the context, whatever is asked later.

A probe is one chunk's prompt ("Repeat the previous context exactly.", then the chunk itself) placed right
after the context. Probes run beside the context through the layers that score with them; each sees the
context's keys and its own, never another probe's, so memory stays one chunk's attention at a time.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from core.prompt import PromptTemplate

CHUNK = 2048  # context tokens one probe repeats (KVzip uses about 2K)
OVERLAP = 8  # a later chunk's prompt quotes the previous chunk's last tokens, so the repeat has a start
QUERY_BLOCK = 512  # probe queries scored at once: a [heads, 512, keys] float32 block at a time


@dataclass(frozen=True)
class Probe:
    """One chunk's reconstruction prompt: its token ids, and for each the context position it repeats
    (-1 for the prompt's own tokens)."""

    ids: Tensor  # [m]
    source: Tensor  # [m] int64


def probes_for(
    tokenizer, template: PromptTemplate, context_ids: list[int], chunk: int = CHUNK, device: str = "cpu"
) -> list[Probe]:
    """The probes that repeat the whole context (the template's head too) in chunks of `chunk` tokens."""
    probes, previous = [], None
    for begin in range(0, len(context_ids), chunk):
        end = min(begin + chunk, len(context_ids))
        if previous is None:
            request = "Repeat the previous context exactly."
        else:
            quoted = tokenizer.decode(context_ids[max(previous, begin - OVERLAP) : begin])
            request = f"Repeat the part of the previous context exactly, starting with {quoted}"
        prompt = tokenizer(template.question_text(request), add_special_tokens=False)["input_ids"]
        ids = torch.tensor(prompt + context_ids[begin:end], device=device)
        source = torch.cat([torch.full((len(prompt),), -1), torch.arange(begin, end)]).to(device)
        probes.append(Probe(ids, source))
        previous = begin
    return probes


def probe_attention(q: Tensor, k: Tensor, v: Tensor, context: int, span: slice, scale: float) -> tuple[Tensor, Tensor]:
    """Exact attention of a probe's queries over the context's keys and its own (causal among its own), and
    the score of each context key in `span` (those the probe repeats, as KVzip scores them): the most
    attention any query of its GQA group gives it.

    q: [heads, m, d]; k, v: [kv_heads, context + m, d], the context's first -> output [heads, m, d] in q's
    dtype, scores [kv_heads, span's length] float32. A query's attention on a key is exp(logit - logsumexp
    of its logits): the scores need each query's logsumexp beside the output, then the span's logits again
    (with the logsumexp folded into the product), QUERY_BLOCK queries at a time, maxed before the exp.
    """
    heads, m, _ = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    keys, values = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    future = torch.ones(m, m, dtype=torch.bool, device=q.device).triu(1)
    output, lse = attention_with_logsumexp(q, keys, values, future, scale)
    span_keys = keys[:, span].float()
    span_keys = torch.cat([span_keys, torch.ones_like(span_keys[..., :1])], dim=-1).transpose(-1, -2)
    queries = torch.cat([q.float() * scale, -lse.unsqueeze(-1)], dim=-1)  # q.k * scale - lse in one product
    best = torch.full((heads, span_keys.shape[-1]), float("-inf"), device=q.device)
    for begin in range(0, m, QUERY_BLOCK):
        best = torch.maximum(best, (queries[:, begin : begin + QUERY_BLOCK] @ span_keys).amax(dim=1))
    scores = best.exp().view(kv_heads, group, -1).amax(dim=1)
    return output, scores


def attention_with_logsumexp(q: Tensor, k: Tensor, v: Tensor, future: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Attention of q [heads, m, d] over k, v [heads, n, d], whose last m keys are the queries' own with the
    `future` [m, m] among them masked -> output [heads, m, d], each query's logsumexp [heads, m] float32.
    On the CPU, PyTorch's flash kernel gives both; elsewhere they are computed QUERY_BLOCK queries at a time."""
    m, n = q.shape[1], k.shape[1]
    mask = torch.zeros(m, n, dtype=q.dtype, device=q.device)
    mask[:, n - m :] = mask[:, n - m :].masked_fill(future, float("-inf"))
    if q.device.type == "cpu":
        output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), 0.0, False, attn_mask=mask, scale=scale
        )
        return output[0], lse[0].float()
    return blocked_attention_with_logsumexp(q, k, v, mask, scale)


def blocked_attention_with_logsumexp(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float):
    """attention_with_logsumexp where no kernel gives the logsumexp: `mask` [m, n] additive, in float32."""
    m = q.shape[1]
    output, lse = torch.empty_like(q), torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    for begin in range(0, m, QUERY_BLOCK):
        block = slice(begin, min(begin + QUERY_BLOCK, m))
        logits = q[:, block].float() @ k.float().transpose(-1, -2) * scale + mask[block].float()
        lse[:, block] = logits.logsumexp(dim=-1)
        output[:, block] = (logits.softmax(dim=-1) @ v.float()).to(q.dtype)
    return output, lse
