"""The accuracy-first policy's parts: budgets with token floors, a scoring window that is the question, and the
policy in tokens recorded in a saved cache; each against a slow reference or the plain definition."""

import pytest
import torch

from core.errors import InputError
from core.methods import Budget, make_method
from core.options import BuildPlan
from core.runner import Runner
from core.storage import load_cache, read_manifest, save_cache
from tests.helpers import (
    assert_one_line_error,
    assert_same_cache,
    assert_top_selection,
    fastkv,
    full_prefill,
    hf_qk,
    make_document,
    random_ids,
    reference_window_scores,
)

PROMPT = 200


@pytest.mark.parametrize(
    ("text", "context", "tokens"),
    [("25%,100", 200, 100), ("25%,100", 1000, 250), ("0.1,64", 100, 64), ("10%,1", 100, 10), ("100%,5", 3, 5)],
)
def test_a_share_with_a_floor_keeps_whichever_is_more(text, context, tokens):
    budget = Budget.parse(text)
    assert budget.tokens(context) == tokens
    assert Budget.parse(str(budget)) == budget  # its spelling in a manifest reads back as the same budget


@pytest.mark.parametrize("text", ["25%,", "25%,0", "25%,-3", "25%,x", "1024,64", ",64", "25%,64,8", "25%,1.5"])
def test_a_malformed_floor_is_refused(text):
    with pytest.raises(InputError):
        Budget.parse(text)


@pytest.mark.parametrize("window", ["0", "-1", "last", "8.5", ""])
def test_a_malformed_window_is_refused(window):
    with pytest.raises(InputError):
        make_method("fastkv", window=window)


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--budget", "25%,0", "--budget takes a share and a floor as 25%,2048"),
        ("--budget", "2048,25%", "--budget takes a share and a floor"),
        ("--tsp-rate", "20%,many", "--tsp-rate takes a share and a floor"),
        ("--window", "everything", "--window takes a number of tokens or 'question'"),
    ],
)
def test_bad_policy_options_exit_2_with_one_line(tmp_path, option, value, needle):
    document = tmp_path / "doc.txt"
    document.write_text("The lamp was lit in 1871.")
    assert_one_line_error(fastkv("ask", document, "When?", option, value), needle)


@pytest.mark.parametrize("name", ["snapkv", "fastkv"])
@pytest.mark.parametrize("floor", [30, 150, 400])
def test_floors_are_honoured_in_every_layer_and_by_tsp(tiny_model, name, floor):
    runner, ids = Runner(tiny_model), random_ids(PROMPT, tiny_model.config.vocab_size, seed=floor)
    num_layers = runner.num_layers
    options = {"budget": f"10%,{floor}"} | ({"tsp_rate": f"5%,{floor}"} if name == "fastkv" else {})

    prefill = runner.prefill(ids, make_method(name, **options))

    kept = min(max(PROMPT // 10, floor), PROMPT)
    propagated = min(max(PROMPT // 20, floor, kept), PROMPT)
    tsp = num_layers // 2 - 1
    seen = [PROMPT if name == "snapkv" or i <= tsp else propagated for i in range(num_layers)]
    assert prefill.layer_tokens == seen
    assert prefill.cache.kept_tokens_per_layer == [min(kept, n) for n in seen]
    for layer in prefill.cache.layers:
        assert (layer.positions.diff(dim=1) > 0).all()
        assert torch.equal(layer.positions[:, -8:], torch.arange(PROMPT - 8, PROMPT).expand(layer.length and 2, -1))


def test_a_floor_above_the_context_is_no_compression_at_all(tiny_model):
    runner, ids = Runner(tiny_model), random_ids(PROMPT, tiny_model.config.vocab_size, seed=5)

    floored = runner.prefill(ids, make_method("fastkv", budget=f"10%,{PROMPT}", tsp_rate=f"20%,{PROMPT}"))

    full = runner.prefill(ids)
    assert_same_cache(floored.cache, full.cache)
    assert torch.equal(floored.logits, full.logits)


@pytest.mark.parametrize("question", [1, 5, 23])
def test_a_question_window_keeps_every_question_token_and_selects_by_the_reference(tiny_model, question):
    """`window question` resolved for a prompt ending with `question` tokens: every layer keeps those
    tokens at their positions, and per KV head the best prefix tokens by the §3 reference scored with
    exactly those queries (GQA groups share a row, as the reference sums them)."""
    ids, positions, count = random_ids(PROMPT, tiny_model.config.vocab_size, seed=question), torch.arange(PROMPT), 40
    method = make_method("snapkv", budget=str(count), window="question", pooling="avgpool").for_question(question)
    hidden = full_prefill(tiny_model, ids).hidden_states

    prefill = Runner(tiny_model).prefill(ids, method)

    kept = max(count, question)
    for i, layer in enumerate(prefill.cache.layers):
        assert layer.length == kept
        tail = torch.arange(PROMPT - question, PROMPT).expand(layer.keys.shape[0], -1)
        assert torch.equal(layer.positions[:, -question:], tail)
        scores = reference_window_scores(*hf_qk(tiny_model, i, hidden[i][0], positions), question, "avgpool")
        for row, reference in zip(layer.positions.tolist(), scores.tolist(), strict=True):
            assert_top_selection(row, reference, window=question)


def test_an_unresolved_question_window_resolves_to_the_prompt_end_without_a_question():
    method = make_method("fastkv", window="question")
    assert method.window is None
    assert method.for_question(17).window == 17
    assert method.for_question(None).window == 8
    assert make_method("fastkv", window=12).for_question(17).window == 12  # a number means what it says


# --- the policy in tokens, in the manifest and `cache info` ---------------------------------------------------

DOCUMENT = make_document([" ".join(f"Bay {i} logged {i * 3} ships in {1800 + i}." for i in range(17))])


@pytest.mark.parametrize("query_aware", [False, True])
def test_a_saved_cache_records_its_policy_in_tokens(engine, tmp_path, query_aware):
    method = make_method("fastkv", budget="10%,64", tsp_rate="20%", window="question")
    saved = engine.build([DOCUMENT], BuildPlan(method, query_aware=query_aware), reserved=128)
    path = tmp_path / "c.fkv"
    save_cache(path, saved.cache, saved.manifest, "float32")

    policy = read_manifest(path).policy

    context = saved.manifest.context_tokens
    assert context // 10 < 64 < context // 5  # the floor decides the budget, the share what propagates
    assert policy["budget_tokens"] == max(context // 10, 64)
    assert policy["propagated_tokens"] == max(context // 5, policy["budget_tokens"])
    assert policy["tsp_layer"] == engine.runner.num_layers // 2 - 1
    assert policy["window"] == (None if query_aware else 8)  # each question's own, or the document's last 8
    assert load_cache(path)[1].policy == policy
    shown = fastkv("cache", "info", path)
    assert shown.exit_code == 0
    assert f"{policy['budget_tokens']:,} tokens per layer" in shown.stdout
    assert f"{policy['propagated_tokens']:,} propagated after layer {policy['tsp_layer']}" in shown.stdout
