"""KVzip (Kim et al., arXiv 2505.23416): question-agnostic selection for a cache that many questions share.

Each cached pair scores by how much the model needs it to repeat the context (core/reconstruction.py:
the most attention any repeating query of its GQA group gives it), so what is kept does not depend on
any one question. Budgets are uniform (every layer and KV head keeps as many), adaptive (a layer's
budget shared across its KV heads by score, as AdaKV) or global (one budget over every layer and KV head,
KVzip's default: a pair is kept where its score is among the cache's best).

With a TSP layer, the reconstruction scores also choose which tokens run past it (FastKV's Token-Selective
Propagation), the probes' copies of them included, so the deeper layers run on the selected tokens only.
"""

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from core.errors import InputError
from core.kvcache import EMPTY
from core.methods.adaptive import HEAD_FLOOR, adaptive_top_tokens, widest_head
from core.methods.base import Budget, LayerInput, ScoredMethod, Selection, check_kernel, top_tokens
from core.methods.tsp import Propagation, check_tsp_layer
from core.reconstruction import CHUNK

HEAD_BUDGETS = ("uniform", "adaptive", "global")


@dataclass
class KVzip(Propagation, ScoredMethod):
    name: ClassVar[str] = "kvzip"
    selects_by_question: ClassVar[bool] = False
    reconstructs: ClassVar[bool] = True
    # The default of `cache build`, chosen on the tuning set by the rule in docs/benchmarks.md (the same answer as
    # fullkv on 85% of the questions, at most one of its right answers lost per 25, then the smallest file):
    # 60% of the pairs over the whole cache. Uniform budgets lost most answers at every share.
    budget: Budget = field(default_factory=lambda: Budget(0.6, proportional=True))
    head_budget: str = "global"
    tsp_layer: int | None = None  # None: the middle layer, num_layers // 2 - 1 (with a tsp_rate)
    tsp_rate: Budget | None = None  # None: every layer runs on every token
    # Max-pooling width of the TSP ranking, as fastkv's: the deeper layers see nothing TSP drops, so it
    # carries whole spans; the per-token reconstruction scores alone propagate scattered tokens.
    tsp_kernel: int = 31
    chunk: int = CHUNK

    def __post_init__(self):
        super().__post_init__()
        if self.head_budget not in HEAD_BUDGETS:
            raise InputError(f"--head-budget must be one of {', '.join(HEAD_BUDGETS)}, got '{self.head_budget}'")
        if self.tsp_rate is not None:
            self.tsp_rate = Budget.parse(self.tsp_rate, "--tsp-rate")
        check_tsp_layer(self.tsp_layer)
        check_kernel(self.tsp_kernel)
        if self.chunk < 1:
            raise InputError(f"the reconstruction chunk must be at least 1 token, got {self.chunk}")

    @property
    def propagates(self) -> bool:  # deeper layers run on fewer tokens only with a tsp_rate
        return self.tsp_rate is not None

    def reconstruction_depth(self, context_len: int, num_layers: int) -> int:
        """The first layers whose scores the selection needs: past a TSP layer that propagates no more than a
        uniform budget keeps, every token that reaches a layer stays, so the probes stop at the TSP layer."""
        tsp = self.tsp_layer_for(num_layers)
        if tsp is None or self.head_budget == "global":
            return num_layers
        if self.propagated_tokens(context_len) <= self.budget_tokens(context_len):
            return tsp + 1
        return num_layers

    def resolved(self, context_len: int, num_layers: int) -> dict:
        resolved = {**super().resolved(context_len, num_layers), "head_budget": self.head_budget}
        tsp = self.tsp_layer_for(num_layers)
        if tsp is None:
            return resolved
        propagated = min(self.propagated_tokens(context_len), context_len)
        return {**resolved, "tsp_layer": tsp, "propagated_tokens": propagated}

    def peak_cache_tokens(self, context_len: int, num_layers: int) -> int:
        if self.head_budget == "uniform":
            return super().peak_cache_tokens(context_len, num_layers)
        tsp = self.tsp_layer_for(num_layers)
        if tsp is None:
            return context_len * num_layers  # every pair is held until the last layer's scores are in
        deeper = min(self.propagated_tokens(context_len), context_len) * (num_layers - tsp - 1)
        return context_len * (tsp + 1) + deeper

    def held_tokens(self, context_len: int) -> int:
        return context_len  # the probes' hidden states: a copy of the context, and their prompts

    def scores(self, layer: LayerInput) -> Tensor:
        return layer.reconstruction[:, : layer.present - self.scoring_window]

    def propagation_scores(self, layer: LayerInput, scores: Tensor) -> Tensor:
        """A token any KV head needs goes on, with its neighbours within tsp_kernel // 2."""
        ranking = scores.amax(0, keepdim=True)
        return F.max_pool1d(ranking, kernel_size=self.tsp_kernel, stride=1, padding=self.tsp_kernel // 2)

    def keep_tokens(self, scores: Tensor, count: int) -> Tensor:
        if self.head_budget == "adaptive":
            return adaptive_top_tokens(scores, count, self.scoring_window)
        return top_tokens(scores, count, self.scoring_window)

    def select(self, layer: LayerInput) -> Selection:
        if layer.reconstruction is None:
            if self.kept_count(layer) is None and self.propagated_count(layer) is None:
                return Selection()  # past the probes' depth: every token that reaches the layer stays
            raise InputError("--method kvzip scores with reconstruction probes: build a cache with it")
        if self.head_budget != "global":
            return super().select(layer)
        propagated = self.propagated_count(layer)
        propagate = None
        if propagated is not None:
            ranking = self.propagation_scores(layer, self.scores(layer))
            propagate = top_tokens(ranking, propagated, self.scoring_window)[0]
        return Selection(propagate=propagate, deferred=self.scores(layer))

    def select_deferred(self, scores: list[Tensor], context_len: int) -> list[Tensor]:
        """Global budgets: the cache's best `layers x kv_heads x (budget - window)` pairs over every layer and
        KV head, each layer's head at least HEAD_FLOOR and at most HEAD_CAP of the mean, with its last
        `window` tokens. scores: per layer [kv_heads, present - window] -> per layer [kv_heads, width]."""
        window = self.scoring_window
        per_head = max(min(self.budget_tokens(context_len), context_len) - window, 0)
        floor, cap = int(HEAD_FLOOR * per_head), widest_head(per_head + window, window, context_len - window)
        pool = torch.cat([s.flatten() for s in scores])
        total = min(per_head * sum(s.shape[0] for s in scores), pool.numel())
        threshold = pool.topk(total).values[-1] if total else math.inf
        keeps = []
        for layer_scores in scores:
            heads, prefix = layer_scores.shape
            counts = (layer_scores >= threshold).sum(dim=-1).clamp(min=min(floor, prefix), max=min(cap, prefix))
            width = int(counts.max())
            ranked = layer_scores.topk(width, dim=-1).indices  # [kv_heads, width], best first
            beyond = torch.arange(width, device=ranked.device)[None, :] >= counts[:, None]
            chosen = ranked.masked_fill(beyond, EMPTY).sort(dim=-1).values
            tail = torch.arange(prefix, prefix + window, device=ranked.device).expand(heads, -1)
            keeps.append(torch.cat([chosen, tail], dim=-1))
        return keeps
