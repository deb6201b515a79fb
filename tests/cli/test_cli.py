"""`fastkv ask` end to end on a tiny saved model: exit codes, stdout and stderr checked apart."""

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from core.documents import read_document
from core.prompt import Context, PromptTemplate, encode_context, encode_question
from fastkv_cli.app import app
from tests.helpers import assert_one_line_error
from tests.json_schema import DOCUMENT_KEYS, SCHEMA, STATS_KEYS
from tests.pdfs import make_blank_pdf, make_encrypted_pdf, make_text_pdf
from tests.tiny_models import fastkv_command

QUESTION = "When was the lighthouse automated?"
DOC_TEXT = "The Harrow Point lighthouse was automated in 1987.\nThomas Arkwright Bell designed the tower.\n"
MAX_NEW = 4
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture
def doc(tmp_path) -> Path:
    path = tmp_path / "doc.txt"
    path.write_text(DOC_TEXT)
    return path


@pytest.fixture
def ask(tiny_model_folder):
    """Run `fastkv ask ARGS --model TINY --max-new-tokens 4` in-process."""

    def run(*args: str, input: bytes | str | None = None, model: str | None = None):
        argv = ["ask", *map(str, args), "--model", model or str(tiny_model_folder.path)]
        if "--max-new-tokens" not in args:
            argv += ["--max-new-tokens", str(MAX_NEW)]
        return CliRunner().invoke(app, argv, input=input)

    return run


def json_answer(result) -> dict:
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


def prompt_tokens(folder: Path, paths: list[Path], question: str) -> tuple[Context, int]:
    """The context the CLI builds (untruncated) and the question's token count, computed independently."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = PromptTemplate.for_tokenizer(tokenizer)
    context = encode_context(tokenizer, template, [read_document(str(path)) for path in paths])
    return context, len(encode_question(tokenizer, template, question))


# --- a good answer ------------------------------------------------------------------------------


def test_answer_on_stdout_stats_table_on_stderr(ask, doc):
    answer = json_answer(ask(doc, QUESTION, "--json", "--quiet"))["answer"]

    result = ask(doc, QUESTION)

    assert result.exit_code == 0, result.output
    assert answer  # the tiny model never emits end-of-turn, so 4 tokens always decode to some text
    assert result.stdout == (answer if answer.endswith("\n") else answer + "\n")  # streamed, then ended
    for row in ("prefill", "time to first token", "decode", "context tokens", "KV cache"):
        assert row in result.stderr
        assert row not in result.stdout
    assert result.stderr.count("model load") == 1  # its line, above the table; no cache was loaded
    assert "cache load" not in result.stderr


def test_json_is_one_line_with_the_stable_schema(ask, doc, tiny_model_folder):
    context, question_tokens = prompt_tokens(tiny_model_folder.path, [doc], QUESTION)

    result = ask(doc, QUESTION, "--json")

    data = json_answer(result)
    assert SCHEMA <= data.keys()
    assert data["question"] == QUESTION
    assert data["model"] == str(tiny_model_folder.path)
    assert isinstance(data["answer"], str) and data["answer"]
    assert isinstance(data["method"], str) and data["method"]
    [document] = data["documents"]
    assert DOCUMENT_KEYS <= document.keys()
    assert document["name"] == str(doc)
    assert document["sha256"] == hashlib.sha256(doc.read_bytes()).hexdigest()
    assert document["pages"] == 1
    assert document["tokens"] == context.tokens_per_document[0]  # the page, without the template around it
    stats = data["stats"]
    assert STATS_KEYS <= stats.keys()
    for key in ("load_s", "read_s", "tokenize_s", "prefill_s", "ttft_s", "decode_tokens_per_s"):
        assert isinstance(stats[key], float) and stats[key] >= 0, key
    assert stats["cache_load_s"] is None  # `ask` loads no saved cache
    assert stats["new_tokens"] == MAX_NEW
    assert stats["context_tokens"] == len(context.ids) + question_tokens
    config_bytes_per_token = 2 * 4 * 2 * 16 * 4  # K and V, 4 layers, 2 KV heads, head_dim 16, fp32
    assert stats["kv_bytes_full"] == config_bytes_per_token * stats["context_tokens"]
    assert 0 < stats["kv_bytes_kept"] <= stats["kv_bytes_full"]
    assert len(stats["kept_tokens_per_layer"]) == 4
    assert all(0 < kept <= stats["context_tokens"] for kept in stats["kept_tokens_per_layer"])
    assert "KV cache" in result.stderr  # the table still goes to stderr, only stdout is data


def test_quiet_keeps_stderr_free_of_the_table(ask, doc):
    result = ask(doc, QUESTION, "--quiet")

    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
    assert result.stderr.strip() == ""


def test_quiet_leaves_stderr_empty(ask, doc):
    result = ask(doc, QUESTION, "--quiet")

    assert result.exit_code == 0, result.output
    assert result.stderr == ""


def test_stdin_as_document(ask):
    data = json_answer(ask("-", QUESTION, "--json", "--quiet", input=DOC_TEXT.encode()))

    [document] = data["documents"]
    assert document["name"] == "<stdin>"
    assert document["sha256"] == hashlib.sha256(DOC_TEXT.encode()).hexdigest()
    assert data["answer"]


def test_several_documents_keep_their_order(ask, doc, tmp_path):
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(make_text_pdf(["The keeper logged 41 ships.", "The lamp burned paraffin."]))

    data = json_answer(ask(pdf, doc, QUESTION, "--json", "--quiet"))

    assert [(d["name"], d["pages"]) for d in data["documents"]] == [(str(pdf), 2), (str(doc), 1)]


# --- bad input: exit 2 and one line ---------------------------------------------------------------

BAD_DOCUMENTS = {
    "missing": None,
    "directory": "dir",
    "empty": b"",
    "whitespace-only": b"  \n\t\n",
    "binary": b"\x7fELF\x02\x01\x01\x00\x00\x00",
    "not-utf8": "Caf\xe9 cr\xe8me".encode("latin-1"),
    "utf16": "hello".encode("utf-16"),
    "encrypted-pdf": make_encrypted_pdf(),
    "textless-pdf": make_blank_pdf(),
    "corrupt-pdf": b"%PDF-1.4\nthis is not really a pdf\n%%EOF\n",
    "truncated-pdf": make_text_pdf(["Some text that will be cut off."])[:150],
}


@pytest.mark.parametrize("case", list(BAD_DOCUMENTS))
def test_bad_document_exits_2_with_one_line_naming_it(ask, tmp_path, case):
    content = BAD_DOCUMENTS[case]
    path = tmp_path / (f"{case}.pdf" if case.endswith("pdf") else f"{case}.txt")
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)

    assert_one_line_error(ask(path, QUESTION), str(path))


def test_bad_document_on_stdin_names_stdin(ask):
    assert_one_line_error(ask("-", QUESTION, input=b""), "<stdin>")


@pytest.mark.parametrize("name", ["notes[draft].txt", "notes[/draft].txt"])
def test_error_message_is_printed_verbatim_not_as_markup(ask, tmp_path, name):
    (tmp_path / "notes[").mkdir()  # so "notes[/draft].txt" is a missing file in an existing folder "notes["
    path = tmp_path / name

    assert_one_line_error(ask(path, QUESTION), str(path))


def test_empty_question_exits_2(ask, doc):
    assert_one_line_error(ask(doc, "   "), "question is empty")


def test_context_overflow_exits_2_with_both_token_counts(ask, tmp_path, tiny_model_folder):
    long_doc = tmp_path / "long.txt"
    long_doc.write_text(" ".join(f"w{i}" for i in range(400)))
    context, question_tokens = prompt_tokens(tiny_model_folder.path, [long_doc], QUESTION)
    needed = len(context.ids) + question_tokens + MAX_NEW
    assert needed > tiny_model_folder.window

    result = ask(long_doc, QUESTION)

    assert_one_line_error(result, f"{needed:,} tokens", f"window is {tiny_model_folder.window:,}", "--truncate middle")


def test_truncate_middle_fills_the_window_and_reports_dropped_tokens(ask, tmp_path, tiny_model_folder):
    long_doc = tmp_path / "long.txt"
    long_doc.write_text(" ".join(f"w{i}" for i in range(400)))
    context, question_tokens = prompt_tokens(tiny_model_folder.path, [long_doc], QUESTION)
    overflow = len(context.ids) + question_tokens + MAX_NEW - tiny_model_folder.window
    assert overflow > 0

    data = json_answer(ask(long_doc, QUESTION, "--truncate", "middle", "--json", "--quiet"))

    stats = data["stats"]
    assert stats["dropped_tokens"] == overflow
    assert stats["context_tokens"] + MAX_NEW == tiny_model_folder.window  # nothing dropped beyond the overflow
    assert data["documents"][0]["tokens"] == context.tokens_per_document[0] - overflow
    assert stats["new_tokens"] == MAX_NEW


def test_unknown_truncate_mode_exits_2_even_when_the_context_fits(ask, doc):
    assert_one_line_error(ask(doc, QUESTION, "--truncate", "start"), "start")


def test_unsupported_model_type_exits_2_naming_the_supported_types(ask, doc, unsupported_model_folder):
    line = assert_one_line_error(ask(doc, QUESTION, model=str(unsupported_model_folder)), "gpt2")

    for model_type in SUPPORTED:
        assert model_type in line


def test_missing_model_path_exits_2(ask, doc, tmp_path):
    missing = tmp_path / "no-such-model"

    assert_one_line_error(ask(doc, QUESTION, model=str(missing)), str(missing))


def test_folder_that_is_not_a_model_exits_2(ask, doc, tmp_path):
    assert_one_line_error(ask(doc, QUESTION, model=str(tmp_path)), str(tmp_path))


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [("--dtype", "int8", "float32"), ("--device", "quantum", "quantum"), ("--max-new-tokens", "0", "--max-new-tokens")],
)
def test_bad_option_values_exit_2(ask, doc, option, value, needle):
    result = ask(doc, QUESTION, option, value)

    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert needle in result.stderr
    assert "Traceback" not in result.output


# --- the installed command, in a real process ------------------------------------------------------


def run_fastkv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*fastkv_command(), *args], capture_output=True, text=True, timeout=120)


def test_installed_command_answers_with_the_tiny_model(doc, tiny_model_folder):
    result = run_fastkv("ask", str(doc), QUESTION, "--model", str(tiny_model_folder.path), "--max-new-tokens", "4")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "KV cache" in result.stderr and "KV cache" not in result.stdout
    assert "Traceback" not in result.stderr


def test_installed_command_bad_document_is_one_line_without_traceback(tmp_path):
    missing = tmp_path / "missing.txt"

    result = run_fastkv("ask", str(missing), QUESTION)

    assert result.returncode == 2
    assert result.stdout == ""
    assert [line for line in result.stderr.splitlines() if line.strip()] == [f"error: {missing}: no such file"]
