"""Held tokens and their revival by a question (core/revival.py), per model family."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from core.methods import LayerInput, Method, Selection, make_method
from core.methods.scoring import window_scores
from core.revival import Revival
from core.runner import Runner
from tests.helpers import random_ids

TOL = 1e-4  # fp32
CONTEXT, QUESTION = 48, 6


@dataclass
class PropagateFirst(Method):
    """Caches everything; at `layer`, passes on only the first `count` tokens. Those never attend to
    the later ones, so every deeper layer's cache equals a full prefill's for them."""

    name: ClassVar[str] = "propagate-first"
    layer: int = 1
    count: int = 30

    def select(self, layer: LayerInput) -> Selection:
        if layer.index != self.layer:
            return Selection()
        return Selection(propagate=torch.arange(self.count))


def held_prefill(runner: Runner, ids: torch.Tensor, layer: int = 1, count: int = 30):
    return runner.prefill(ids, PropagateFirst(layer=layer, count=count), hold=True).cache


def test_prefill_holds_exactly_the_tokens_tsp_drops(tiny_model):
    ids = random_ids(CONTEXT, tiny_model.config.vocab_size, seed=3)
    runner = Runner(tiny_model)
    method = make_method("fastkv", budget="25%", tsp_rate="25%", tsp_layer=1)

    held = runner.prefill(ids, method, hold=True).cache
    plain = runner.prefill(ids, method).cache

    assert plain.held is None
    deeper = set(held.layers[2].positions[0].tolist())
    assert held.held.layer == 1
    assert sorted(deeper | set(held.held.positions.tolist())) == list(range(CONTEXT))
    assert not deeper & set(held.held.positions.tolist())
    assert held.held.hidden.shape == (CONTEXT - len(deeper), tiny_model.config.hidden_size)


def test_reviving_every_held_token_equals_a_full_prefill(tiny_model):
    """Tokens dropped after every propagated one, revived, see exactly what a full prefill shows them:
    the question's logits and every layer's cache equal the full prefill of context + question."""
    ids = random_ids(CONTEXT + QUESTION, tiny_model.config.vocab_size, seed=4)
    runner = Runner(tiny_model)
    cache = held_prefill(runner, ids[:CONTEXT])

    logits = runner.extend(cache, ids[CONTEXT:], revival=Revival(CONTEXT, "maxpool", 7))

    full = runner.prefill(ids)
    assert (logits - full.logits).abs().max() < TOL
    for layer, reference in zip(cache.layers, full.cache.layers, strict=True):
        assert torch.equal(layer.positions, reference.positions)  # merged back into position order
        assert (layer.keys - reference.keys).abs().max() < TOL
        assert (layer.values - reference.values).abs().max() < TOL


def test_without_revival_held_tokens_change_nothing(tiny_model):
    ids = random_ids(CONTEXT + QUESTION, tiny_model.config.vocab_size, seed=5)
    runner = Runner(tiny_model)
    held, plain = held_prefill(runner, ids[:CONTEXT]), held_prefill(runner, ids[:CONTEXT])
    plain.held = None

    assert torch.equal(runner.extend(held, ids[CONTEXT:]), runner.extend(plain, ids[CONTEXT:]))
    assert [layer.length for layer in held.layers] == [layer.length for layer in plain.layers]


@pytest.mark.parametrize("count", [4, 12])
def test_revival_brings_back_only_held_tokens_the_question_ranks_in_its_top(tiny_model, count):
    ids = random_ids(CONTEXT + QUESTION, tiny_model.config.vocab_size, seed=6)
    runner = Runner(tiny_model)
    cache = held_prefill(runner, ids[:CONTEXT])
    stored = cache.layers[2].positions[0].tolist()
    revival = Revival(count, "maxpool", 7)
    ranked: list[torch.Tensor] = []
    real_ranked = revival.ranked

    def spy(*args):
        ranked.append(real_ranked(*args))
        return ranked[-1]

    object.__setattr__(revival, "ranked", spy)
    runner.extend(cache, ids[CONTEXT:], revival=revival)

    [top] = ranked
    assert top.shape == (count,)
    revived = sorted(set(top.tolist()) - set(stored))
    for layer in cache.layers[2:]:
        positions = layer.positions[0].tolist()
        assert positions == sorted(stored + revived + list(range(CONTEXT, CONTEXT + QUESTION)))
    assert cache.layers[1].length == CONTEXT + QUESTION  # layers up to TSP are not touched


def test_ranking_positions_in_order_equals_the_tsp_ranking(tiny_model):
    """With every context key present in position order, the query ranks exactly as FastKV's TSP."""
    config = tiny_model.config
    generator = torch.Generator().manual_seed(7)
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = torch.randn(heads, QUESTION, d, generator=generator)
    keys = torch.randn(kv_heads, CONTEXT + QUESTION, d, generator=generator)
    positions = torch.arange(CONTEXT).expand(kv_heads, -1)

    ranked = Revival(10, "maxpool", 31).ranked(q, keys, positions, CONTEXT)

    tsp = window_scores(q, keys, QUESTION, "maxpool", 31).sum(0)
    assert torch.equal(ranked, tsp.topk(10).indices.sort().values)


def test_ranking_does_not_depend_on_where_keys_sit_in_the_cache(tiny_model):
    config = tiny_model.config
    generator = torch.Generator().manual_seed(8)
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = torch.randn(heads, QUESTION, d, generator=generator)
    keys = torch.randn(kv_heads, CONTEXT + QUESTION, d, generator=generator)
    positions = torch.arange(CONTEXT).expand(kv_heads, -1)
    order = torch.randperm(CONTEXT, generator=generator)
    shuffled = torch.cat([keys[:, order], keys[:, CONTEXT:]], dim=1)
    revival = Revival(10, "avgpool", 7)

    assert torch.equal(
        revival.ranked(q, shuffled, positions[:, order], CONTEXT), revival.ranked(q, keys, positions, CONTEXT)
    )
