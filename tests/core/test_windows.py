"""Scoring windows longer than the tokens that can serve as queries: every path scores with what there
is, and a query-aware cache still answers exactly as `ask` with the same window (issue: `--window 32`
crashed every query of a query-aware cache whose question was shorter)."""

import pytest
import torch

from core.generation import Decoding, generate
from core.methods import Budget, PauseAfter, make_method
from core.options import BuildPlan
from core.runner import Runner
from core.storage import save_cache
from tests.helpers import make_document, random_ids

TOL = 1e-4  # fp32
CONTEXT = 48
QUESTION_LENGTHS = [1, 3, 12]
WINDOWS = [1, 2, 8, 13, 40, 80]  # up to longer than the question, and than context + question
RESERVED = 128  # the tiny folder's window is 512, less than build's default reserve


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("question", QUESTION_LENGTHS)
def test_a_paused_prefill_resumed_by_a_short_question_equals_the_one_pass_prefill(tiny_model, window, question):
    ids = random_ids(CONTEXT + question, tiny_model.config.vocab_size, seed=window * 31 + question)
    runner = Runner(tiny_model)
    method = make_method("fastkv", budget="25%", tsp_rate="30%", window=window)
    pause = PauseAfter(method.pause_layer(runner.num_layers), window=window)
    cache = runner.prefill(ids[:CONTEXT], pause).cache

    logits = runner.extend(cache, ids[CONTEXT:], method)

    asked = runner.prefill(ids, method)
    assert (logits - asked.logits).abs().max() < TOL
    for layer, reference in zip(cache.layers, asked.cache.layers, strict=True):
        assert torch.equal(layer.positions, reference.positions)
        assert (layer.keys - reference.keys).abs().max() < TOL
    resumed = generate(runner, cache, logits, 4, stop_ids=set())
    assert resumed == generate(runner, asked.cache, asked.logits, 4, stop_ids=set())


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("method_name", ["fastkv", "snapkv"])
def test_re_selection_by_fewer_queries_than_the_window_keeps_the_budget_and_the_new_tokens(
    tiny_model, window, method_name
):
    ids = random_ids(CONTEXT + 3, tiny_model.config.vocab_size, seed=window)
    runner = Runner(tiny_model)
    cache = runner.prefill(ids[:CONTEXT]).cache
    budget = 10

    runner.extend(cache, ids[CONTEXT:], make_method(method_name, budget=str(budget), window=window))

    scoring = min(window, 3)  # the window shrinks to the 3 appended queries
    for layer in cache.layers:
        assert layer.length == max(budget, scoring)
        window_positions = torch.arange(CONTEXT + 3 - scoring, CONTEXT + 3).expand(layer.keys.shape[0], -1)
        assert torch.equal(layer.positions[:, -scoring:], window_positions)
        assert (layer.positions[:, 1:] > layer.positions[:, :-1]).all()


# --- every kind of saved cache, through the engine and a float32 file --------------------------------------

DOCUMENT = make_document([" ".join(f"Entry {i}: the lamp at bay {i % 5} burned {i * 7} hours." for i in range(12))])
QUESTIONS = ["Why?", "Which bay burned the most hours of all the bays listed in the logbook entries above?"]
KINDS = {
    "question-blind": {},
    "two-stage": {"budget": "60%", "query_budget": "20%"},
    "steered": {"questions": ["Which lamp burned longest?"]},
    "query-aware": {"query_aware": True},
}


@pytest.mark.parametrize("window", [1, 8, 32, 300])
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_cache_kind_answers_with_any_window_and_query_aware_answers_as_ask(engine, tmp_path, kind, window):
    options = dict(KINDS[kind])
    method = make_method("fastkv", budget=options.pop("budget", "20%"), window=window)
    query_budget = options.pop("query_budget", None)
    query_budget = None if query_budget is None else Budget.parse(query_budget)
    saved = engine.build([DOCUMENT], BuildPlan(method, query_budget, **options), reserved=RESERVED)
    path = tmp_path / "c.fkv"
    save_cache(path, saved.cache, saved.manifest, "float32")
    loaded = engine.load_saved(path)
    decoding = Decoding(max_new_tokens=6)

    for question in QUESTIONS:
        answer = engine.query(loaded, question, decoding=decoding)
        assert answer.stats.new_tokens >= 1
        if kind == "query-aware":
            asked = engine.ask([DOCUMENT], question, method, decoding)
            assert answer.text == asked.text
            assert answer.stats.kept_tokens_per_layer == asked.stats.kept_tokens_per_layer
