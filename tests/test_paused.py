"""A prefill paused at the TSP layer and resumed by a question equals `ask`'s one-pass prefill, per family."""

import pytest
import torch

from core.generation import generate
from core.methods import PauseAfter, make_method
from core.runner import Runner
from tests.helpers import random_ids

TOL = 1e-4  # fp32
CONTEXT, QUESTION = 60, 9
SETTINGS = {
    "tsp-20%": {"budget": "20%", "tsp_rate": "20%"},
    "budget-above-rate": {"budget": "40%", "tsp_rate": "10%", "window": 4},
    "late-tsp": {"budget": "30%", "tsp_layer": 2, "pooling": "avgpool"},
    "nothing-dropped": {"budget": "100%", "tsp_rate": "100%"},
}


def test_a_paused_prefill_caches_every_token_up_to_its_layer_and_holds_their_hidden_states(tiny_model):
    ids = random_ids(CONTEXT, tiny_model.config.vocab_size, seed=11)
    runner = Runner(tiny_model)

    paused = runner.prefill(ids, PauseAfter(layer=1))

    full = runner.prefill(ids)
    with torch.inference_mode():
        hidden = tiny_model(ids.unsqueeze(0), output_hidden_states=True).hidden_states[2][0]  # after layer 1
    assert paused.logits is None and paused.cache.paused.layer == 1
    assert (paused.cache.paused.hidden - hidden).abs().max() < TOL
    for i, (layer, reference) in enumerate(zip(paused.cache.layers, full.cache.layers, strict=True)):
        if i <= 1:
            assert torch.equal(layer.positions, reference.positions)
            assert torch.equal(layer.keys, reference.keys) and torch.equal(layer.values, reference.values)
        else:
            assert layer.length == 0 and layer.keys.shape[::2] == reference.keys.shape[::2]
    assert paused.layer_tokens == [CONTEXT, CONTEXT]  # the deeper layers never ran


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_resuming_with_the_question_equals_the_one_pass_prefill(tiny_model, setting):
    ids = random_ids(CONTEXT + QUESTION, tiny_model.config.vocab_size, seed=12)
    runner = Runner(tiny_model)
    method = make_method("fastkv", **SETTINGS[setting])
    cache = runner.prefill(ids[:CONTEXT], PauseAfter(method.pause_layer(runner.num_layers))).cache

    logits = runner.extend(cache, ids[CONTEXT:], method)

    asked = runner.prefill(ids, method)
    assert (logits - asked.logits).abs().max() < TOL
    assert cache.paused is None and cache.seq_len == CONTEXT + QUESTION
    for layer, reference in zip(cache.layers, asked.cache.layers, strict=True):
        assert torch.equal(layer.positions, reference.positions)
        assert (layer.keys - reference.keys).abs().max() < TOL
        assert (layer.values - reference.values).abs().max() < TOL


def test_decoding_after_a_resume_equals_decoding_after_ask(tiny_model):
    ids = random_ids(CONTEXT + QUESTION, tiny_model.config.vocab_size, seed=13)
    runner = Runner(tiny_model)
    method = make_method("fastkv", budget="25%")
    cache = runner.prefill(ids[:CONTEXT], PauseAfter(method.pause_layer(runner.num_layers))).cache
    logits = runner.extend(cache, ids[CONTEXT:], method)
    asked = runner.prefill(ids, method)

    resumed = generate(runner, cache, logits, 8, stop_ids=set())
    expected = generate(runner, asked.cache, asked.logits, 8, stop_ids=set())

    assert resumed == expected and len(resumed) == 8
