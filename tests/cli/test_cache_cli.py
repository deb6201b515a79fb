"""`fastkv cache build|query|info` end to end on tiny saved models: exit codes, stdout and stderr apart."""

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.methods import make_method
from core.storage import load_cache, read_manifest
from tests.helpers import assert_one_line_error, fastkv
from tests.json_schema import SCHEMA, STATS_KEYS
from tests.pdfs import make_text_pdf
from tests.tiny_models import fastkv_command

PDF_PAGES = ["The keeper logged 41 ships in 1871.\nThe lamp burned colza oil.", "In 1904 the lamp burned paraffin."]
DOC_NAMES = ["logbook.pdf", "notes.txt"]  # `built` names them relative to their folder: the same prompt every run
NOTES = "The Harrow Point lighthouse was automated in 1987.\nThomas Arkwright Bell designed the tower.\n"
MAX_NEW = 4


pytestmark = pytest.mark.usefixtures("wide_terminal")


@pytest.fixture(scope="module")
def model(build_model_folder) -> Path:
    return build_model_folder


@pytest.fixture(scope="module")
def other_model(tmp_path_factory, tiny_tokenizer, model) -> Path:
    """The same architecture and tokenizer as `model`, with different weights."""
    folder = tmp_path_factory.mktemp("other-model")
    weights = AutoModelForCausalLM.from_pretrained(model)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in weights.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    weights.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("docs")
    pdf, notes = (folder / name for name in DOC_NAMES)
    pdf.write_bytes(make_text_pdf(PDF_PAGES))
    notes.write_text(NOTES)
    return [pdf, notes]


def build(documents, output: Path, model: Path, *options):
    return fastkv("cache", "build", *documents, "-o", output, "--model", model, *options)


def query(cache: Path, *args, model: Path | None = None, input: str | None = None):
    options = ["--model", model] if model else []
    return fastkv("cache", "query", cache, *args, *options, "--max-new-tokens", MAX_NEW, input=input)


@pytest.fixture(scope="module")
def built(tmp_path_factory, documents, model) -> tuple[Path, dict]:
    """One question-blind fastkv cache built through the CLI, with the JSON summary its build printed."""
    path = tmp_path_factory.mktemp("built") / "logbook.fkv"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(documents[0].parent)  # a document's name is in the prompt: keep tmp paths out of it
        options = ["--method", "fastkv", "--budget", "50%", "--question-blind", "--json", "--quiet"]
        result = build(DOC_NAMES, path, model, *options)
    assert result.exit_code == 0, result.output
    return path, json.loads(result.stdout)


def json_lines(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


# --- build ------------------------------------------------------------------------------------------------


def test_build_writes_a_loadable_cache(built, model):
    path, summary = built

    cache, manifest = load_cache(path)

    assert summary["output"] == str(path)
    assert summary["file_bytes"] == path.stat().st_size
    assert summary["kept_tokens_per_layer"] == cache.kept_tokens_per_layer
    assert manifest.model.spec == str(model)
    assert manifest.method.name == "fastkv" and manifest.method.parameters["budget"] == "50%"
    assert manifest.storage.dtype == "int6" and manifest.storage.quantization.bits == 6  # a question-blind default
    assert [(d.name, d.pages) for d in manifest.documents] == [(DOC_NAMES[0], 2), (DOC_NAMES[1], 1)]
    assert manifest.documents[1].sha256 == hashlib.sha256(NOTES.encode()).hexdigest()
    assert cache.seq_len == manifest.context_tokens == summary["context_tokens"]


def test_the_default_build_is_kvzip_selected_once_and_stored_in_int6(tmp_path, documents, model):
    path = tmp_path / "default.fkv"

    result = build(documents, path, model, "--json", "--quiet")

    assert result.exit_code == 0, result.output
    manifest = read_manifest(path)
    assert json.loads(result.stdout)["kind"] == "question-blind" and manifest.paused_layer is None
    assert manifest.method.name == "kvzip" and manifest.method.parameters == make_method("kvzip", window=8).parameters()
    assert manifest.storage.dtype == "int6"
    shown = " ".join(fastkv("cache", "info", path).stdout.split())
    assert "scored by the model repeating the context · the last 8 tokens always kept" in shown
    assert json_lines(fastkv("cache", "info", path, "--json"))[0]["reconstruction_scored"] is True


def test_build_again_needs_force(tmp_path, documents, model):
    path = tmp_path / "c.fkv"
    first = build(documents, path, model, "--quiet")
    assert first.exit_code == 0, first.output
    assert "wrote" not in first.stderr  # --quiet
    before = path.read_bytes()

    refused = build(documents, path, model)

    assert_one_line_error(refused, str(path), "exists", "--force")
    assert path.read_bytes() == before

    forced = build(documents, path, model, "--force", "--cache-dtype", "float32")

    assert forced.exit_code == 0, forced.output
    assert f"wrote {path}" in forced.stderr
    assert read_manifest(path).storage.dtype == "float32"
    assert path.stat().st_size > len(before)  # fp32 keys and values: the file was replaced
    assert [p.name for p in tmp_path.iterdir()] == ["c.fkv"]  # no temp file left behind


def test_build_into_a_directory_exits_2(tmp_path, documents, model):
    assert_one_line_error(build(documents, tmp_path, model), str(tmp_path), "is a directory")
    assert list(tmp_path.iterdir()) == []


def test_build_with_gemfilter_exits_2(tmp_path, documents, model):
    assert_one_line_error(build(documents, tmp_path / "c.fkv", model, "--method", "gemfilter"), "gemfilter")
    assert list(tmp_path.iterdir()) == []


def test_coded_storage_of_a_question_blind_cache_exits_2_before_the_prefill(tmp_path, documents, model):
    """Coded storage holds the every-token layers of a query-aware cache; a question-blind one keeps a subset."""
    result = build(documents, tmp_path / "c.fkv", model, "--question-blind", "--cache-dtype", "coded")
    assert_one_line_error(result, "--cache-dtype coded stores query-aware caches")  # no progress lines: no prefill
    assert list(tmp_path.iterdir()) == []


def test_build_with_steering_questions(tmp_path, documents, model):
    questions = tmp_path / "questions.txt"
    questions.write_text("When did the lamp burn paraffin?\n\n  How many ships were logged?  \n")
    path = tmp_path / "c.fkv"

    result = build(documents, path, model, "--questions", questions, "--budget", "10%", "--quiet")

    assert result.exit_code == 0, result.output
    cache, manifest = load_cache(path)
    assert manifest.steering_questions == 2
    assert cache.seq_len == manifest.context_tokens
    assert all(int(layer.positions.max()) < manifest.context_tokens for layer in cache.layers)


# --- query ------------------------------------------------------------------------------------------------


def assert_streamed(stdout: str, answers: list[str]) -> None:
    """stdout is each answer streamed and ended by a newline; an answer may lack only a tail that ends
    inside a multi-byte character (held back by the stream until it closes)."""
    rest = stdout
    for answer in answers:
        shown = next(n for n in range(len(answer), -1, -1) if rest.startswith(answer[:n] + "\n"))
        assert shown == len(answer) or answer.endswith("\ufffd"), (stdout, answers)
        rest = rest[shown + 1 :]
    assert rest == ""


def test_query_prints_one_answer_per_question(built):
    path, _ = built
    questions = ["When?", "Who designed the tower?"]
    answers = [d["answer"] for d in json_lines(query(path, *questions, "--json", "--quiet"))]

    result = query(path, *questions)

    assert result.exit_code == 0, result.output
    assert len(answers) == 2 and all(answers)
    assert_streamed(result.stdout, answers)
    assert result.stderr.count("time to first token") == 2  # one stats table per answer, on stderr
    assert result.stderr.count("cache load") == 1  # the load they share: one line before them


def test_streamed_answers_equal_the_json_answers(built):
    path, _ = built
    questions = ["Who designed the tower?", "What did the lamp burn?"]  # their 4 tokens end mid-character
    answers = [d["answer"] for d in json_lines(query(path, *questions, "--json", "--quiet"))]

    result = query(path, *questions, "--quiet")

    assert result.stdout == "".join(answer + "\n" for answer in answers)


def test_query_json_is_one_line_per_question_with_the_schema(built, model):
    path, summary = built
    manifest = read_manifest(path)

    result = query(path, "When was the lighthouse automated?", "Who designed it?", "--json")

    first, second = json_lines(result)  # exactly two lines, nothing else on stdout
    assert [first["question"], second["question"]] == ["When was the lighthouse automated?", "Who designed it?"]
    for data in (first, second):
        assert SCHEMA <= data.keys()
        assert data["model"] == str(model)
        assert data["method"] == "fastkv"
        assert data["budget"] == "50%"  # the build's budget: no re-selection was asked for
        assert [(d["name"], d["pages"]) for d in data["documents"]] == [(DOC_NAMES[0], 2), (DOC_NAMES[1], 1)]
        assert [d["sha256"] for d in data["documents"]] == [d.sha256 for d in manifest.documents]
        stats = data["stats"]
        assert STATS_KEYS <= stats.keys()
        assert isinstance(stats["prefill_s"], float) and stats["prefill_s"] >= 0
        assert stats["new_tokens"] == MAX_NEW
        assert stats["context_tokens"] > summary["context_tokens"]  # the context plus this question
        assert len(stats["kept_tokens_per_layer"]) == 4
    assert isinstance(first["stats"]["cache_load_s"], float)  # loaded once, for the first answer
    assert second["stats"]["cache_load_s"] is None  # which the second reused
    assert "KV cache" in result.stderr


THREE_QUESTIONS = ["When was the lighthouse automated?", "Who designed the tower?", "What did the lamp burn?"]


def run_query(cache: Path, *args) -> subprocess.CompletedProcess:
    """`fastkv cache query` as a shell runs it: the installed command in a process of its own."""
    command = [*fastkv_command(), "cache", "query", str(cache), *map(str, args), "--max-new-tokens", str(MAX_NEW)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)


def test_three_questions_report_the_loads_once_and_each_answer_its_own_timings(built):
    path, summary = built

    shown = run_query(path, *THREE_QUESTIONS)
    piped = run_query(path, *THREE_QUESTIONS, "--json")

    assert shown.returncode == 0, shown.stderr
    loads = [line for line in shown.stderr.splitlines() if "load" in line]
    assert len(loads) == 1 and "model load" in loads[0] and "cache load" in loads[0], shown.stderr
    assert shown.stderr.count("time to first token") == 3  # each answer's table: its own timings
    assert shown.stderr.index("cache load") < shown.stderr.index("time to first token")  # above the first table
    assert "cache load" not in shown.stdout and "time to first token" not in shown.stdout  # stdout: answers only

    assert piped.returncode == 0, piped.stderr
    answers = [json.loads(line) for line in piped.stdout.splitlines()]  # one line per answer, nothing else
    assert [a["question"] for a in answers] == THREE_QUESTIONS
    first, *later = (a["stats"] for a in answers)
    assert STATS_KEYS <= first.keys() and all(STATS_KEYS <= stats.keys() for stats in later)
    assert isinstance(first["load_s"], float) and isinstance(first["cache_load_s"], float)  # waited for both
    assert [(s["load_s"], s["cache_load_s"]) for s in later] == [(None, None)] * 2  # reused them
    for stats in (first, *later):
        assert isinstance(stats["ttft_s"], float) and isinstance(stats["prefill_s"], float)
        assert stats["new_tokens"] == MAX_NEW
        assert stats["context_tokens"] > summary["context_tokens"]  # the cached context plus its own question
    assert piped.stderr.count("cache load") == 1 and piped.stderr.count("time to first token") == 3


def test_query_budget_re_selects(built):
    path, summary = built

    [data] = json_lines(query(path, "When?", "--budget", "10%", "--json", "--quiet"))

    assert data["budget"] == "10%"
    context = data["stats"]["context_tokens"]
    question = context - summary["context_tokens"]  # the question is the window, counted in the budget
    expected = max(int(0.1 * context), question)
    assert data["stats"]["kept_tokens_per_layer"] == [expected] * 4
    assert all(expected < stored for stored in summary["kept_tokens_per_layer"])


def test_query_without_model_uses_the_files_model(built, model):
    path, _ = built

    [data] = json_lines(fastkv("cache", "query", path, "When?", "--json", "--quiet", "--max-new-tokens", "2"))

    assert data["model"] == str(model)
    assert data["stats"]["new_tokens"] == 2


def test_query_reads_one_question_per_stdin_line(built):
    path, _ = built
    expected = {d["question"]: d["answer"] for d in json_lines(query(path, "q1", "q2", "q3", "--json", "--quiet"))}

    answers = json_lines(query(path, "--json", "--quiet", input="q1\n\nq2\n   \nq3\n"))

    assert [d["question"] for d in answers] == ["q1", "q2", "q3"]
    assert {d["question"]: d["answer"] for d in answers} == expected  # each answered from the unchanged cache


@pytest.mark.parametrize("stdin", ["", None, "\n  \n"], ids=["empty", "closed", "blank-lines"])
def test_query_with_no_questions_on_stdin_prints_nothing(built, stdin):
    path, _ = built

    result = query(path, "--json", input=stdin)

    assert result.exit_code == 0, result.output
    assert result.stdout == ""


def test_query_answers_match_repeated_questions(built):
    """One process, one cache: the first question's tokens never reach the third's answer."""
    path, _ = built

    first, _, third = json_lines(query(path, "When?", "Who designed the tower?", "When?", "--json", "--quiet"))

    assert first["answer"] == third["answer"]


# --- info -------------------------------------------------------------------------------------------------


def test_info_shows_model_method_and_a_page_table(built, model):
    path, _ = built

    result = fastkv("cache", "info", path)

    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"{model} (llama, 4 layers, 2 KV heads)" in out
    assert "fastkv (" in out and "budget=50%" in out
    assert "share of each page's tokens kept" in out
    rows = [line for line in out.splitlines() if DOC_NAMES[0] in line or DOC_NAMES[1] in line]
    assert len(rows) == 3  # two PDF pages and one text page
    assert "checksum ok" in out


def test_info_json_has_kept_tokens_and_page_coverage(built):
    path, summary = built

    result = fastkv("cache", "info", path, "--json")

    [info] = json_lines(result)
    assert info["kept_tokens_per_layer"] == summary["kept_tokens_per_layer"]
    assert info["file_bytes"] == path.stat().st_size
    assert [d["name"] for d in info["manifest"]["documents"]] == DOC_NAMES
    pdf_pages, notes_pages = info["page_coverage"]
    assert len(pdf_pages) == 2 and len(notes_pages) == 1
    assert all(0 <= share <= 1 for share in pdf_pages + notes_pages)
    assert any(share > 0 for share in pdf_pages + notes_pages)


def test_info_says_how_each_query_selects(built, documents, model, tmp_path):
    two_stage, query_aware = tmp_path / "two-stage.fkv", tmp_path / "query-aware.fkv"
    assert build(documents, two_stage, model, "--budget", "50%", "--query-budget", "10%", "--quiet").exit_code == 0
    built_query_aware = build(documents, query_aware, model, "--budget", "20%", "--query-aware")
    assert built_query_aware.exit_code == 0, built_query_aware.output

    shown = {path: fastkv("cache", "info", path).stdout for path in (built[0], two_stage, query_aware)}
    [info] = json_lines(fastkv("cache", "info", query_aware, "--json"))

    assert "none: answers use every stored token" in shown[built[0]]
    assert "scored by the last 8 tokens" in " ".join(shown[built[0]].split())  # fastkv, question-blind
    assert "two-stage: each question re-selects the stored tokens down to 10%" in shown[two_stage]
    assert "query-aware: paused after layer 1; each question resumes the prefill as `ask` at budget 20%" in (
        " ".join(shown[query_aware].split())
    )
    assert info["manifest"]["paused_layer"] == 1
    assert info["paused_bytes"] == load_cache(query_aware)[0].paused.nbytes > 0
    # every token up to the paused layer, none deeper: the pages are whole where the file holds tokens
    context = info["manifest"]["context_tokens"]
    assert info["kept_tokens_per_layer"] == [context, context, 0, 0]
    for output in (shown[query_aware], built_query_aware.stderr):  # cache info, cache build's summary
        assert "every token in layers 0-1; layers 2-3: what each question selects" in " ".join(output.split())
    assert all(share == 1 for pages in info["page_coverage"] for share in pages)
    assert "coded: int6's rounding error" in " ".join(shown[query_aware].split())  # the default storage
    assert "int6 in groups of 16" in shown[two_stage]  # ... and a question-blind cache's, which coded cannot hold
    assert "hidden states" not in shown[two_stage]  # it holds none


def test_a_query_aware_cache_answers_as_ask_does(documents, model, tmp_path):
    path = tmp_path / "query-aware.fkv"
    built = build(documents, path, model, "--budget", "20%", "--query-aware", "--cache-dtype", "float32", "--quiet")
    assert built.exit_code == 0, built.output

    [answer] = json_lines(query(path, "Who designed the tower?", "--json", model=model))
    asked = fastkv("ask", *documents, "Who designed the tower?", "--model", model, "--budget", "20%",
                   "--max-new-tokens", MAX_NEW, "--json", "--quiet")  # fmt: skip

    [expected] = json_lines(asked)
    assert answer["answer"] == expected["answer"] and answer["budget"] == "20%"
    assert answer["stats"]["kept_tokens_per_layer"] == expected["stats"]["kept_tokens_per_layer"]


@pytest.mark.parametrize(
    ("options", "query_aware"),
    [
        ([], False),  # the default: kvzip, selected once for every question
        (["--method", "fastkv"], True),  # fastkv's TSP layer: each question resumes, answering as ask
        (["--method", "fastkv", "--question-blind"], False),
        (["--method", "snapkv"], False),  # no TSP layer to pause at
        (["--method", "kvzip", "--tsp-rate", "50%"], False),  # selects without the question
        (["--budget", "60%", "--query-budget", "20%"], False),  # each question re-selects instead
        (["--query-aware", "--question-blind"], False),  # the last flag wins, as for every flag pair
    ],
)
def test_which_builds_are_query_aware(documents, model, tmp_path, options, query_aware):
    path = tmp_path / "c.fkv"

    result = build(documents, path, model, *options, "--json", "--quiet")

    assert result.exit_code == 0, result.output
    assert (read_manifest(path).paused_layer is not None) == query_aware
    assert (json.loads(result.stdout)["kind"] == "query-aware") == query_aware


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--method", "snapkv"], "--method snapkv has none"),
        (["--query-budget", "10%"], "--query-budget does not apply to --query-aware"),
        (["--method", "kvzip", "--tsp-rate", "50%"], "--method kvzip selects without one"),
    ],
)
def test_query_aware_build_refuses_what_does_not_apply_before_loading(documents, tmp_path, options, needle):
    result = build(documents, tmp_path / "x.fkv", tmp_path / "no-such-model", "--query-aware", *options)

    assert_one_line_error(result, needle)
    assert not (tmp_path / "x.fkv").exists()


def test_a_kvzip_cache_at_every_token_answers_as_fullkv_and_at_half_keeps_half(documents, model, tmp_path):
    questions = ["In which year was the lighthouse automated?", "Who designed the tower?"]
    answers = {}
    for name, options in {
        "fullkv": ["--method", "fullkv"],
        "kvzip-all": ["--method", "kvzip", "--budget", "100%"],
        "kvzip-half": ["--method", "kvzip", "--budget", "50%", "--window", "4", "--head-budget", "uniform"],
    }.items():
        path = tmp_path / f"{name}.fkv"
        built = build(documents, path, model, *options, "--json", "--quiet")
        assert built.exit_code == 0, built.output
        assert json.loads(built.stdout)["kind"] == "question-blind"
        answers[name] = [line["answer"] for line in json_lines(query(path, *questions, "--json", "--quiet"))]
        manifest = read_manifest(path)
        assert manifest.method.name == ("fullkv" if name == "fullkv" else "kvzip")
    half = read_manifest(tmp_path / "kvzip-half.fkv")

    assert answers["kvzip-all"] == answers["fullkv"]
    assert half.policy["budget_tokens"] == half.context_tokens // 2
    assert all(layer.length == half.context_tokens // 2 for layer in load_cache(tmp_path / "kvzip-half.fkv")[0].layers)


def test_ask_with_kvzip_exits_2_pointing_at_cache_build(documents, model):
    result = fastkv("ask", *documents, "Who designed the tower?", "--model", model, "--method", "kvzip")

    assert_one_line_error(result, "--method kvzip", "cache build")


# --- refusals ---------------------------------------------------------------------------------------------


@pytest.fixture
def truncated(built, tmp_path) -> Path:
    path = tmp_path / "cut.fkv"
    path.write_bytes(built[0].read_bytes()[:-100])
    return path


@pytest.fixture
def not_safetensors(tmp_path) -> Path:
    path = tmp_path / "notes.fkv"
    path.write_text(NOTES)
    return path


# what the line must say besides the path (a truncated file says so)
BAD_FILE_CAUSES = {"truncated": (), "not_safetensors": ("not readable as safetensors",)}


@pytest.mark.parametrize("bad", list(BAD_FILE_CAUSES))
@pytest.mark.parametrize("command", ["query", "info"])
def test_a_bad_cache_file_exits_2_with_one_line(request, model, bad, command):
    path = request.getfixturevalue(bad)
    args = ["cache", command, path] + (["When?", "--model", model] if command == "query" else [])

    line = assert_one_line_error(fastkv(*args), f"error: {path}: ")

    for cause in BAD_FILE_CAUSES[bad]:
        assert cause in line.removeprefix(f"error: {path}: ")


def test_a_flipped_byte_exits_2_naming_the_checksum(built, tmp_path, model):
    data = bytearray(built[0].read_bytes())
    data[-5] ^= 0x01
    path = tmp_path / "flipped.fkv"
    path.write_bytes(bytes(data))

    line = assert_one_line_error(query(path, "When?", model=model), str(path))

    assert "checksum" in line.removeprefix(f"error: {path}")


def test_a_cache_from_another_model_exits_2_naming_it(built, model, other_model):
    path, _ = built

    line = assert_one_line_error(query(path, "When?", model=other_model), str(path), "weights_sha256")

    assert str(model) in line and str(other_model) in line


def test_a_missing_cache_file_exits_2(tmp_path):
    missing = tmp_path / "missing.fkv"

    assert_one_line_error(fastkv("cache", "query", missing, "When?"), str(missing), "no such cache file")


def test_build_fits_a_short_document_into_a_small_window(tmp_path, documents, tiny_model_folder):
    result = build(documents[1:], tmp_path / "c.fkv", tiny_model_folder.path, "--quiet")

    assert result.exit_code == 0, result.output
