"""A prefill paused at the TSP layer and resumed by a question equals `ask`'s one-pass prefill, per family."""

import pytest
import torch
import torch.nn.functional as F

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


def test_the_layers_past_a_resume_attend_with_the_causal_kernel(tiny_model, monkeypatch):
    """Up to the pause the question reads the cached context through a mask; past it a layer holds only
    the tokens running through it, a plain triangle: SDPA's causal kernel, with no [tokens, tokens] mask
    (on CPU the mask runs at half the kernel's speed). The last layer reads its last token only."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        calls.append((q.shape[-2], k.shape[-2], attn_mask is not None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    ids = random_ids(CONTEXT + QUESTION, tiny_model.config.vocab_size, seed=14)
    runner = Runner(tiny_model)
    method = make_method("fastkv", budget="20%", tsp_rate="20%")
    pause = method.pause_layer(runner.num_layers)
    cache = runner.prefill(ids[:CONTEXT], PauseAfter(pause)).cache
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    runner.extend(cache, ids[CONTEXT:], method)

    last = runner.num_layers - 1
    assert pause < last - 1 and len(calls) == runner.num_layers
    assert calls[: pause + 1] == [(QUESTION, CONTEXT + QUESTION, True, False)] * (pause + 1)
    propagated = calls[pause + 1][0]
    assert QUESTION < propagated < CONTEXT + QUESTION
    assert calls[pause + 1 : last] == [(propagated, propagated, False, True)] * (last - pause - 1)
    assert calls[last] == (1, propagated, False, False)
