"""Signals, pipes, concurrency, permissions and paths: each failure is one line on stderr with its exit
code, no traceback, and no partial file left behind (docs/reliability.md lists them)."""

import importlib.util
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import core.atomic
import core.documents
import core.engine
import core.models
import core.storage.files
from core.documents import read_document
from core.engine import Engine
from core.errors import DocumentError, InputError
from core.methods import make_method
from core.models import EMBEDDED_PACKAGE, converted_folder, load_model
from core.options import BuildPlan
from core.storage import load_cache, save_cache
from tests.helpers import assert_one_line_error, default_sigint, fastkv, leftovers, make_document
from tests.tiny_models import fastkv_command, save_slow_llama

QUESTION = "How many ships did the keeper log?"
DOC_TEXT = "The Harrow Point lighthouse was automated in 1987.\nThe keeper logged 41 ships in 1871.\n"
ROOT = Path(__file__).resolve().parents[2]
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def doc(tmp_path) -> Path:
    path = tmp_path / "doc.txt"
    path.write_text(DOC_TEXT)
    return path


def environment(**extra: str) -> dict:
    return {**os.environ, **extra}


def start(*args, **kwargs) -> subprocess.Popen:
    env = kwargs.pop("env", environment())
    return subprocess.Popen([*fastkv_command(), *map(str, args)], env=env, preexec_fn=default_sigint, **kwargs)


# --- a model slow enough to interrupt -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory, tiny_tokenizer) -> Path:
    """A 32K window: a 14K-token prefill takes seconds on CPU, and the answer never ends early."""
    return save_slow_llama(tmp_path_factory.mktemp("slow-llama"), tiny_tokenizer, 32768, endless=True)


@pytest.fixture(scope="module")
def long_doc(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("long") / "log.txt"
    path.write_text(
        " ".join(f"The keeper logged {i} ships and {i % 7} storms in the year {1800 + i}." for i in range(500))
    )
    return path


def read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    """Read a pty (or pipe) until `needle` shows up (b"": any byte); everything read so far."""
    seen, deadline = b"", time.monotonic() + timeout
    while not (seen and needle in seen) and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed its end
                break
            if not chunk:
                break
            seen += chunk
    return seen


def drain(fd: int) -> bytes:
    seen = b""
    while select.select([fd], [], [], 0.5)[0]:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    return seen


def test_ctrl_c_during_the_prefill_of_a_build_exits_130_and_writes_nothing(slow_model, long_doc, tmp_path):
    """stderr is a terminal, so the prefill shows progress: Ctrl-C lands once it is under way."""
    output = tmp_path / "out" / "log.fkv"
    output.parent.mkdir()
    terminal, child_end = pty.openpty()
    process = start(
        "cache", "build", long_doc, "-o", output, "--model", slow_model, "--method", "fullkv",
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=child_end, env=environment(TERM="xterm", COLUMNS="100"),
    )  # fmt: skip
    os.close(child_end)
    seen = read_until(terminal, b"prefill", timeout=90)
    assert b"prefill" in seen, seen
    process.send_signal(signal.SIGINT)

    code = process.wait(timeout=60)
    seen += drain(terminal)
    os.close(terminal)

    text = ANSI.sub(b"", seen).decode(errors="replace")
    assert code == 130, text
    assert text.rstrip().endswith("interrupted") and text.count("interrupted") == 1, text
    assert "Traceback" not in text and "Error" not in text
    assert process.stdout.read() == b""
    assert list(output.parent.iterdir()) == []  # neither the cache nor a temp file


def test_ctrl_c_while_the_answer_streams_exits_130_with_one_line(slow_model, doc):
    process = start(
        "ask", doc, QUESTION, "--model", slow_model, "--max-new-tokens", 30000,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    first = read_until(process.stdout.fileno(), b"", timeout=90)  # the first streamed bytes of the answer
    assert first, "no answer streamed"
    process.send_signal(signal.SIGINT)

    code = process.wait(timeout=60)
    stderr = process.stderr.read().decode()

    assert code == 130, stderr
    assert [line for line in stderr.splitlines() if line.strip()] == ["interrupted"]


def test_sigterm_during_a_build_exits_143_and_writes_nothing(doc, tmp_path, monkeypatch, tiny_model_folder):
    """`kill PID` while the prefill runs: the handler fastkv installs turns it into cleanup and exit 143."""
    output = tmp_path / "out" / "c.fkv"
    output.parent.mkdir()
    received = []

    def ours(signum, frame):  # stands by so that a missing handler fails this test instead of killing pytest
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, ours)
    real_prefill = core.engine.Runner.prefill

    def prefill_then_sigterm(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_prefill(self, *args, **kwargs)

    monkeypatch.setattr(core.engine.Runner, "prefill", prefill_then_sigterm)
    try:
        result = fastkv("cache", "build", doc, "-o", output, "--model", tiny_model_folder.path)
    finally:
        restored = signal.signal(signal.SIGTERM, previous)

    assert received == [] and restored is ours  # fastkv's handler got the signal, then gave ours back
    assert result.exit_code == 143, result.output
    assert result.stderr.strip() == "terminated"
    assert list(output.parent.iterdir()) == []


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_ctrl_c_while_a_cache_is_saved_exits_130_and_keeps_the_old_file(
    doc, tmp_path, monkeypatch, tiny_model_folder, overwrite
):
    output = tmp_path / "out" / "c.fkv"
    output.parent.mkdir()
    if overwrite:
        output.write_bytes(b"the previous cache")

    def interrupted_write(f, data, chunk=1 << 24):
        f.write(data[: len(data) // 2])
        raise KeyboardInterrupt  # Ctrl-C halfway through writing the temp file

    monkeypatch.setattr(core.atomic, "write_all", interrupted_write)

    result = fastkv("cache", "build", doc, "-o", output, "--model", tiny_model_folder.path, "--force")

    assert result.exit_code == 130, result.output
    assert result.stderr.strip() == "interrupted"
    assert [p.name for p in output.parent.iterdir()] == (["c.fkv"] if overwrite else [])
    if overwrite:
        assert output.read_bytes() == b"the previous cache"


def test_a_reader_that_leaves_early_ends_the_answer_quietly(slow_model, doc):
    """`fastkv ask ... | head -c 10`: exit 0, nothing on stderr (no "Exception ignored ... BrokenPipeError")."""
    reader = subprocess.Popen(["head", "-c", "10"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    process = start(
        "ask", doc, QUESTION, "--model", slow_model, "--max-new-tokens", 2000,
        stdin=subprocess.DEVNULL, stdout=reader.stdin, stderr=subprocess.PIPE,
    )  # fmt: skip
    reader.stdin.close()

    code = process.wait(timeout=120)
    stderr = process.stderr.read().decode()

    assert len(reader.stdout.read()) == 10 and reader.wait(timeout=10) == 0
    assert code == 0, stderr
    assert stderr == ""


# --- stdin ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory, tiny_model_folder) -> Path:
    folder = tmp_path_factory.mktemp("cache")
    (folder / "notes.txt").write_text(DOC_TEXT)
    path = folder / "notes.fkv"
    result = fastkv("cache", "build", folder / "notes.txt", "-o", path, "--model", tiny_model_folder.path, "--quiet")
    assert result.exit_code == 0, result.output
    return path


def test_query_with_a_closed_stdin_ends_cleanly(cache_file, tiny_model_folder):
    """`fastkv cache query FILE <&-`: the shell closes file descriptor 0, then runs fastkv."""
    command = [*fastkv_command(), "cache", "query", str(cache_file), "--model", str(tiny_model_folder.path), "--json"]
    result = subprocess.run(
        ["sh", "-c", 'exec "$@" <&-', "sh", *command], capture_output=True, text=True, timeout=120, env=environment()
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""  # no questions: no answers, no error


def test_a_closed_stdin_is_an_empty_document(monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)  # what Python sets when the process starts with fd 0 closed

    with pytest.raises(DocumentError, match=r"^<stdin>: the input is empty$"):
        read_document("-")


def test_a_question_on_stdin_that_is_not_utf8_exits_2(cache_file, tiny_model_folder):
    result = fastkv("cache", "query", cache_file, "--model", tiny_model_folder.path, input=b"When?\n\xff\xfe?\n")

    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1] == "error: <stdin>: line 2 is not UTF-8 text"


def test_a_question_with_undecodable_bytes_exits_2(doc, tiny_model_folder):
    assert_one_line_error(
        fastkv("ask", doc, "When\udcff?", "--model", tiny_model_folder.path), "not UTF-8 text", code=2
    )


# --- concurrency ---------------------------------------------------------------------------------------------


def start_build(tiny_model_folder, source: Path, output: Path, *options) -> subprocess.Popen:
    return start(
        "cache", "build", source, "-o", output, "--model", tiny_model_folder.path, "--quiet", *options,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def test_two_forced_builds_of_one_file_leave_one_complete_file(tiny_model_folder, tmp_path):
    documents = [tmp_path / "a.txt", tmp_path / "b.txt"]
    documents[0].write_text(DOC_TEXT)
    documents[1].write_text("The second keeper logged 17 storms.\n" * 3)
    output = tmp_path / "out" / "shared.fkv"
    output.parent.mkdir()

    processes = [start_build(tiny_model_folder, document, output, "--force") for document in documents]
    results = [(p.wait(timeout=120), p.stderr.read().decode()) for p in processes]

    assert [code for code, _ in results] == [0, 0], results
    _, manifest = load_cache(output)  # complete and valid: one of the two builds, whole (the last rename won)
    assert manifest.documents[0].name in {str(d) for d in documents}
    assert [p.name for p in output.parent.iterdir()] == ["shared.fkv"]  # no temp file


def test_two_saves_racing_for_a_new_path_without_force_write_once(tiny_model_folder, tmp_path, monkeypatch):
    """Both saves pass the existence check before either publishes: the hard link lets one win."""
    engine = Engine(load_model(str(tiny_model_folder.path), device="cpu"))
    saved = engine.build([make_document([DOC_TEXT], "notes.txt")], BuildPlan(make_method("fastkv")), reserved=128)
    output = tmp_path / "shared.fkv"
    both_writing = threading.Barrier(2, timeout=30)
    real_write_all = core.atomic.write_all

    def write_together(f, data, chunk=1 << 24):
        both_writing.wait()  # each has its temp file, neither has published
        real_write_all(f, data, chunk)

    monkeypatch.setattr(core.atomic, "write_all", write_together)
    outcomes = []

    def save():
        try:
            save_cache(output, saved.cache, saved.manifest)
            outcomes.append("written")
        except InputError as error:
            outcomes.append(str(error))

    threads = [threading.Thread(target=save) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sorted(outcomes) == [f"{output}: exists; pass --force to overwrite it", "written"]
    load_cache(output)
    assert [p.name for p in tmp_path.iterdir()] == ["shared.fkv"]


def test_four_processes_query_one_cache_at_once(cache_file, tiny_model_folder):
    """safetensors opens the file read-only and writers replace it by rename: no lock is needed."""
    processes = [
        start(
            "cache",
            "query",
            cache_file,
            QUESTION,
            "--model",
            tiny_model_folder.path,
            "--json",
            "--max-new-tokens",
            4,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for _ in range(4)
    ]
    results = [(p.wait(timeout=120), p.stdout.read().decode(), p.stderr.read().decode()) for p in processes]

    assert [code for code, _, _ in results] == [0] * 4, results
    answers = {json.loads(stdout)["answer"] for _, stdout, _ in results}
    assert len(answers) == 1 and answers != {""}


CONVERTER = """
import sys, time
from pathlib import Path
import core.models as models
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

tiny, gguf, barrier, me = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]

class FromTiny:  # stands in for transformers' GGUF reader (30 s on the real model)
    def __init__(self, real, wait=False):
        self.real, self.wait = real, wait

    def from_pretrained(self, folder, gguf_file=None, **kwargs):
        if self.wait:  # both processes have loaded before either saves: their renames race
            (barrier / me).touch()
            deadline = time.monotonic() + 60
            while len(list(barrier.iterdir())) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        return self.real.from_pretrained(tiny, **kwargs)

models.AutoConfig = FromTiny(AutoConfig)
models.AutoTokenizer = FromTiny(AutoTokenizer)
models.AutoModelForCausalLM = FromTiny(AutoModelForCausalLM, wait=True)
print(models.converted_folder(gguf))
"""


def test_two_processes_converting_one_gguf_leave_one_good_folder(tiny_model_folder, tmp_path):
    gguf, barrier, cache = tmp_path / "tiny.gguf", tmp_path / "barrier", tmp_path / "cache"
    gguf.write_bytes(b"GGUF stand-in")
    barrier.mkdir()
    env = environment(XDG_CACHE_HOME=str(cache))
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CONVERTER, str(tiny_model_folder.path), str(gguf), str(barrier), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )  # fmt: skip
        for i in range(2)
    ]
    results = [(p.wait(timeout=120), p.stdout.read().strip(), p.stderr.read()) for p in processes]

    assert [code for code, _, _ in results] == [0, 0], results
    folders = {Path(folder) for _, folder, _ in results}
    assert len(folders) == 1
    [folder] = folders
    assert [p.name for p in (cache / "fastkv" / "models").iterdir()] == [folder.name]  # no staging folder left
    loaded = load_model(str(folder), device="cpu")
    assert loaded.config.num_hidden_layers == 4


class Interrupting:
    """A loader whose model interrupts itself (as Ctrl-C would) while saving into the staging folder."""

    def __init__(self, tiny: Path, real, interrupt: bool = False):
        self.tiny, self.real, self.interrupt = tiny, real, interrupt

    def from_pretrained(self, folder, gguf_file=None, **kwargs):
        loaded = self.real.from_pretrained(self.tiny, **kwargs)
        if self.interrupt:
            save = loaded.save_pretrained

            def save_then_interrupt(directory, **kw):
                save(directory, **kw)  # the weights are written into the staging folder ...
                raise KeyboardInterrupt  # ... and then Ctrl-C

            loaded.save_pretrained = save_then_interrupt
        return loaded


def test_ctrl_c_while_saving_a_converted_model_leaves_no_folder(tiny_model_folder, tmp_path, monkeypatch, doc):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(core.models, "AutoConfig", Interrupting(tiny_model_folder.path, AutoConfig))
    monkeypatch.setattr(core.models, "AutoTokenizer", Interrupting(tiny_model_folder.path, AutoTokenizer))
    monkeypatch.setattr(
        core.models, "AutoModelForCausalLM", Interrupting(tiny_model_folder.path, AutoModelForCausalLM, True)
    )

    result = fastkv("ask", doc, QUESTION, "--model", gguf)

    assert result.exit_code == 130, result.output
    assert result.stderr.strip() == "interrupted"
    assert list((tmp_path / "cache" / "fastkv" / "models").iterdir()) == []  # the staging folder is gone too

    monkeypatch.setattr(core.models, "AutoModelForCausalLM", Interrupting(tiny_model_folder.path, AutoModelForCausalLM))
    folder = converted_folder(gguf)  # the next run converts from scratch
    assert (folder / "config.json").is_file() and leftovers(tmp_path / "cache") == []


# --- permissions and paths ----------------------------------------------------------------------------------------


def build_to(output, doc, tiny_model_folder, *options):
    return fastkv("cache", "build", doc, "-o", output, "--model", tiny_model_folder.path, "--quiet", *options)


def test_output_under_a_file_exits_2_before_any_work(doc, tmp_path, monkeypatch, tiny_model_folder):
    monkeypatch.setattr(core.models, "load_model", None)  # not reached: refused before the model loads

    assert_one_line_error(build_to(doc / "out.fkv", doc, tiny_model_folder), f"{doc}: not a directory", code=2)


def test_an_unwritable_output_directory_exits_2_before_any_work(doc, tmp_path, monkeypatch, tiny_model_folder):
    def denied(*args, **kwargs):  # what a read-only mount or missing permission does (root bypasses chmod)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(core.storage.files.tempfile, "mkstemp", denied)

    assert_one_line_error(
        build_to(tmp_path / "c.fkv", doc, tiny_model_folder),
        f"{tmp_path}: cannot write there (Permission denied)",
        code=2,
    )
    assert not (tmp_path / "c.fkv").exists()


@pytest.mark.skipif(
    not Path("/sys/kernel").is_dir() or os.access("/sys", os.W_OK) is False,
    reason="needs a sysfs root writable by name only",
)
def test_a_real_unwritable_directory_exits_2(doc, tiny_model_folder):
    """sysfs refuses new files even to root, whatever the permission bits say."""
    result = build_to("/sys/out.fkv", doc, tiny_model_folder)

    if result.exit_code == 0:  # a sysfs that takes files: nothing to show here
        os.unlink("/sys/out.fkv")
        pytest.skip("this /sys accepts new files")
    assert_one_line_error(result, "/sys: cannot write there", code=2)


def test_a_full_disk_while_saving_exits_1_and_leaves_no_temp_file(doc, tmp_path, monkeypatch, tiny_model_folder):
    def full(f, data, chunk=1 << 24):
        f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(core.atomic, "write_all", full)

    assert_one_line_error(
        build_to(tmp_path / "c.fkv", doc, tiny_model_folder), "cannot write the cache (No space left on device)", code=1
    )
    assert [p.name for p in tmp_path.iterdir()] == ["doc.txt"]


def test_an_unreadable_document_exits_2(doc, monkeypatch, tiny_model_folder):
    def denied(file, mode="r"):  # root reads any file: simulate what EACCES does for other users
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(core.documents, "open", denied, raising=False)  # shadows the builtin there only

    assert_one_line_error(
        fastkv("ask", doc, QUESTION, "--model", tiny_model_folder.path), f"{doc}: permission denied", code=2
    )


def test_a_cache_home_that_is_a_file_explains_in_one_line(doc, tmp_path, monkeypatch):
    not_a_folder = tmp_path / "cache-home"
    not_a_folder.write_text("a file, not a folder")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    monkeypatch.setenv("XDG_CACHE_HOME", str(not_a_folder))

    line = assert_one_line_error(
        fastkv("ask", doc, QUESTION, "--model", gguf), f"under {not_a_folder / 'fastkv'} (Not a directory)", code=1
    )
    assert line.endswith("point XDG_CACHE_HOME at a writable directory")


def test_a_model_that_needs_remote_code_is_refused_without_running_it(doc, tmp_path):
    folder = tmp_path / "fancy"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "fancy", "auto_map": {"AutoConfig": "configuration_fancy.FancyConfig"}})
    )
    marker = tmp_path / "ran"
    (folder / "configuration_fancy.py").write_text(f"open({str(marker)!r}, 'w').close()\n")

    line = assert_one_line_error(
        fastkv("ask", doc, QUESTION, "--model", folder), "needs its own Python code (auto_map", code=2
    )
    assert "fastkv never runs" in line and "llama, mistral, qwen2, qwen3" in line
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec(EMBEDDED_PACKAGE) is None, reason="the embedded model is not installed")
@pytest.mark.parametrize("moment", ["de-quantizing", "saving"])
def test_ctrl_c_while_converting_the_embedded_gguf_leaves_nothing(tmp_path, doc, moment):
    """The real conversion (~30 s): Ctrl-C while transformers de-quantizes the GGUF, or once the staging
    folder exists (the float32 weights are being written), leaves no converted or staging folder."""
    models = tmp_path / "cache" / "fastkv" / "models"
    terminal, child_end = pty.openpty()
    env = environment(XDG_CACHE_HOME=str(tmp_path / "cache"), TERM="xterm", COLUMNS="100")
    process = start("ask", doc, QUESTION, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=child_end, env=env)
    os.close(child_end)
    seen = read_until(terminal, b"converting", timeout=120)
    assert b"converting" in seen, seen
    deadline = time.monotonic() + 180
    if moment == "de-quantizing":
        seen += read_until(terminal, b"\x00", timeout=3)  # let it get into the GGUF reader
    else:
        while not (models.is_dir() and any(p.name.startswith(".converting-") for p in models.iterdir())):
            assert time.monotonic() < deadline and process.poll() is None, "no staging folder appeared"
            seen += read_until(terminal, b"\x00", timeout=0.02)
    process.send_signal(signal.SIGINT)

    code = process.wait(timeout=120)
    text = ANSI.sub(b"", seen + drain(terminal)).decode(errors="replace")
    os.close(terminal)

    assert code == 130, text
    assert text.rstrip().endswith("interrupted") and "Traceback" not in text
    assert not models.exists() or list(models.iterdir()) == []
