"""Many documents on one machine: `ask --each`, `cache build --each -o DIR`, `cache ask CACHE... QUESTION`;
per-document failures, resumable builds, Ctrl-C. (Ray: tests/core/test_corpus_ray.py.)"""

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from core.corpus import cache_targets
from core.storage import load_cache, read_manifest
from tests.helpers import assert_one_line_error, default_sigint, fastkv, leftovers, write_texts
from tests.json_schema import SCHEMA
from tests.tiny_models import fastkv_command, save_slow_llama

QUESTION = "When was the lighthouse automated?"
MAX_NEW = 4
TEXTS = {
    "harrow.txt": "The Harrow Point lighthouse was automated in 1987.\nThomas Arkwright Bell designed the tower.\n",
    "keeper.md": "The keeper logged 41 ships in 1871.\nThe lamp burned colza oil until 1904.\n",
    "storms.txt": "Storms closed the harbour for nine days in 1953.\nThe lifeboat station opened in 1860.\n",
}


pytestmark = pytest.mark.usefixtures("wide_terminal")


@pytest.fixture(scope="module")
def model(build_model_folder) -> Path:
    return build_model_folder


@pytest.fixture
def docs(tmp_path, monkeypatch) -> list[str]:
    """The documents by relative name (names are part of the prompt), in the test's own folder."""
    monkeypatch.chdir(tmp_path)
    return write_texts(TEXTS)


def lines(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def ask(*args, model):
    return fastkv("ask", *args, "--model", model, "--max-new-tokens", MAX_NEW)


def test_each_answers_each_document_alone_as_ask_would(docs, model):
    result = ask(*docs, QUESTION, "--each", "--json", model=model)
    assert result.exit_code == 0, result.output
    answers = lines(result)
    assert [a["documents"][0]["name"] for a in answers] == docs
    for doc, answer in zip(docs, answers, strict=True):
        assert set(SCHEMA) <= set(answer)
        assert len(answer["documents"]) == 1
        alone = lines(ask(doc, QUESTION, "--json", model=model))[0]
        assert answer["answer"] == alone["answer"]
        assert answer["documents"] == alone["documents"]
    assert [a["stats"]["load_s"] is not None for a in answers] == [True, False, False]  # the model loaded once


def test_each_human_output_names_each_document_then_its_answer_and_sums_up(docs, model):
    result = ask(*docs, QUESTION, "--each", model=model)
    assert result.exit_code == 0, result.output
    headers = [line for line in result.stdout.splitlines() if line.startswith("==> ")]
    assert headers == [f"==> {doc} <==" for doc in docs]
    assert "answered" in result.stderr and "mean time to first token" in result.stderr


def test_a_bad_document_is_its_own_error_line_and_the_rest_go_on(docs, model):
    Path("broken.pdf").write_bytes(b"%PDF-1.4 not really")
    Path("latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    result = ask(docs[0], "broken.pdf", "latin1.txt", docs[1], QUESTION, "--each", "--json", model=model)
    assert result.exit_code == 1
    records = lines(result)
    assert [r["documents"][0]["name"] for r in records] == [docs[0], "broken.pdf", "latin1.txt", docs[1]]
    assert ["error" in r for r in records] == [False, True, True, False]
    assert "broken.pdf" in records[1]["error"] and "UTF-8" in records[2]["error"]
    assert "broken.pdf" in result.stderr and "latin1.txt" in result.stderr


def test_a_document_too_long_fails_alone_unless_truncated(docs, model):
    Path("long.txt").write_text(" ".join(f"word{i}" for i in range(3000)))
    result = ask("long.txt", docs[0], QUESTION, "--each", "--json", model=model)
    assert result.exit_code == 1
    first, second = lines(result)
    assert "window" in first["error"] and "error" not in second
    result = ask("long.txt", docs[0], QUESTION, "--each", "--json", "--truncate", "middle", model=model)
    assert result.exit_code == 0, result.output


def test_each_through_a_server_is_refused_in_one_line(docs, model):
    result = fastkv("ask", *docs, QUESTION, "--each", "--server", "http://127.0.0.1:9")
    assert_one_line_error(result, "--each", "--server off")


def test_ray_without_ray_installed_is_one_line_and_exit_2(docs, model, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    result = ask(*docs, QUESTION, "--ray", model=model)
    assert_one_line_error(result, "pip install", "fastkv[ray]")


# --- cache build --each ----------------------------------------------------------------------------------


def build(*args, model):
    return fastkv("cache", "build", *args, "--each", "--model", model, "--budget", "50%", "--json", "--quiet")


def test_build_each_writes_one_loadable_cache_per_document_named_after_it(docs, model):
    result = build(*docs, "-o", "caches", model=model)
    assert result.exit_code == 0, result.output
    records = lines(result)
    assert [r["document"] for r in records] == docs
    assert sorted(os.listdir("caches")) == ["harrow.fkv", "keeper.fkv", "storms.fkv"]
    for record in records:
        cache, manifest = load_cache(Path(record["output"]))
        assert [d.name for d in manifest.documents] == [record["document"]]
        assert record["skipped"] is False and record["file_bytes"] == Path(record["output"]).stat().st_size


def test_a_rebuild_skips_what_is_up_to_date_and_redoes_what_changed(docs, model):
    assert build(*docs, "-o", "caches", model=model).exit_code == 0
    Path(docs[1]).write_text("The keeper logged 42 ships in 1872.\n")
    records = lines(build(*docs, "-o", "caches", model=model))
    assert [r["skipped"] for r in records] == [True, False, True]
    rebuilt = read_manifest(Path("caches/keeper.fkv")).documents[0].sha256
    assert rebuilt == hashlib.sha256(Path(docs[1]).read_bytes()).hexdigest()
    other = fastkv("cache", "build", *docs, "--each", "-o", "caches", "--model", model, "--budget", "25%", "--json")
    assert [r["skipped"] for r in lines(other)] == [False, False, False]  # other parameters: rebuilt
    forced = fastkv(
        "cache", "build", *docs, "--each", "-o", "caches", "--model", model, "--budget", "25%", "--json", "--force"
    )
    assert [r["skipped"] for r in lines(forced)] == [False, False, False]


def test_colliding_names_get_stable_distinct_files(tmp_path):
    paths = ["a/notes.txt", "b/notes.md", "report.pdf"]
    first = cache_targets(paths, tmp_path)
    assert first == cache_targets(list(paths), tmp_path)
    assert [p.name for p in first][2] == "report.fkv"
    assert len({p.name for p in first}) == 3 and all(p.name.startswith("notes-") for p in first[:2])
    assert cache_targets(list(reversed(paths)), tmp_path) == list(reversed(first))


def test_build_each_to_a_file_is_refused_before_any_work(docs, model):
    Path("taken").write_text("")
    result = fastkv("cache", "build", *docs, "--each", "-o", "taken", "--model", model)
    assert_one_line_error(result, "taken", "not a directory")


# --- cache ask: many caches, one question --------------------------------------------------------------------


def test_cache_ask_answers_every_cache_in_a_directory_as_cache_query_would(docs, model):
    assert build(*docs, "-o", "caches", model=model).exit_code == 0
    result = fastkv("cache", "ask", "caches", QUESTION, "--json", "--max-new-tokens", MAX_NEW)
    assert result.exit_code == 0, result.output
    records = lines(result)
    assert [Path(r["cache"]).name for r in records] == ["harrow.fkv", "keeper.fkv", "storms.fkv"]
    for record in records:
        alone = fastkv("cache", "query", record["cache"], QUESTION, "--json", "--max-new-tokens", MAX_NEW)
        assert record["answer"] == lines(alone)[0]["answer"]


def test_cache_ask_with_a_questions_file_gives_a_line_per_cache_and_question(docs, model):
    assert build(*docs, "-o", "caches", model=model).exit_code == 0
    Path("questions.txt").write_text(f"{QUESTION}\nWho designed the tower?\n")
    Path("caches/broken.fkv").write_bytes(b"not a cache")
    files = ["caches/harrow.fkv", "caches/broken.fkv", "caches/storms.fkv"]
    result = fastkv("cache", "ask", *files, "--questions", "questions.txt", "--json", "--max-new-tokens", MAX_NEW)
    assert result.exit_code == 1
    records = lines(result)
    assert [(r["cache"], r["question"]) for r in records] == [
        (f, q) for f in files for q in (QUESTION, "Who designed the tower?")
    ]
    assert ["error" in r for r in records] == [False, False, True, True, False, False]
    loads = [(r["stats"]["load_s"], r["stats"]["cache_load_s"]) for r in records if "error" not in r]
    assert [(a is not None, b is not None) for a, b in loads] == [  # each load on the first answer that waited
        (True, True), (False, False), (False, True), (False, False),  # for it: the model once, each cache once
    ]  # fmt: skip


def test_cache_ask_without_a_question_is_one_line(docs, model):
    assert_one_line_error(fastkv("cache", "ask", "caches"), "question")


# --- Ctrl-C: finished caches stay, the unfinished one leaves nothing; a rerun does the rest -----------------


@pytest.mark.slow  # about a minute on a busy CPU
def test_ctrl_c_during_build_each_then_a_rerun_builds_only_the_missing_caches(tmp_path, tiny_tokenizer):
    folder = tmp_path / "slow-model"
    save_slow_llama(folder, tiny_tokenizer, 8192)  # a build takes a moment
    names = []
    for i in range(6):
        names.append(f"log{i}.txt")
        (tmp_path / names[-1]).write_text(
            " ".join(f"In {1800 + j} the keeper logged {j + i} ships." for j in range(300))
        )
    command = [*fastkv_command(), "cache", "build", *names, "--each", "-o", "out", "--model", str(folder), "--json"]
    process = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, preexec_fn=default_sigint
    )
    first = process.stdout.readline()  # one cache is done: interrupt the next one
    assert json.loads(first)["document"] == names[0]
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    assert process.returncode == 130
    done = [json.loads(line)["document"] for line in [first, *rest.splitlines()]]
    assert leftovers(tmp_path / "out") == []
    built = sorted(os.listdir(tmp_path / "out"))
    assert built == sorted(name.replace(".txt", ".fkv") for name in done)
    assert len(built) < len(names)
    for name in built:
        load_cache(tmp_path / "out" / name)
    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    skipped = {r["document"]: r["skipped"] for r in map(json.loads, rerun.stdout.splitlines())}
    assert skipped == {name: name in done for name in names}
    for name in names:
        load_cache(tmp_path / "out" / name.replace(".txt", ".fkv"))
