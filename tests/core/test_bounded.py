"""Bounded input (DESIGN.md §12): reading stops once a document certainly overflows the window, keeps a head
and a tail with --truncate middle, extracts PDF pages lazily, and endless streams, devices, FIFOs and huge
files end quickly with one line, in memory that does not grow with the input."""

import io
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import core.documents
from core.documents import CHUNK_BYTES, read_document, read_documents
from core.engine import Engine
from core.errors import ContextOverflowError, DocumentError
from core.models import load_model
from core.token_limit import TokenLimit, TokenTally
from tests.helpers import assert_one_line_error, fastkv
from tests.pdfs import make_text_pdf
from tests.tiny_models import fastkv_command

ROOT = Path(__file__).resolve().parents[2]
WORDS = "the keeper logged ships storms oil lamp harbour tower 1871 paraffin, colza (Ada) Lindqvist".split()
QUESTION = "What did the keeper log?"


def words(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Endless(io.RawIOBase):
    """A stream that never ends: `pattern` again and again; counts what was read."""

    def __init__(self, pattern: bytes):
        self.pattern, self.given = pattern * (CHUNK_BYTES // len(pattern) + 1), 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.pattern[: n if n >= 0 else CHUNK_BYTES]
        self.given += len(data)
        return data


def limit_of(engine: Engine, truncate: str | None = None, reserved: int = 40) -> TokenLimit:
    return engine.token_limit(reserved, truncate)


# --- the count is a lower bound -------------------------------------------------------------------------------


def texts_to_count() -> dict[str, str]:
    rng = random.Random(1)
    return {
        "words": words(40_000),
        "lines": "\n".join(words(rng.randint(0, 30), seed=i) for i in range(3000)),
        "double spaces": words(20_000).replace(" l", "  l").replace(" s", "\t s"),
        "one run of a": "a" * 300_000,
        "no spaces": "日本語のテキスト" * 30_000,
        "digits": "".join(str(rng.randint(0, 9)) for _ in range(200_000)),
        "mixed": "".join(rng.choice(["a", " ", "\n", "é", "日", ".", "  ", "x y"]) for _ in range(200_000)),
    }


def assert_lower_bound(count, text: str, feed: int) -> None:
    tally = TokenTally(count)
    for at in range(0, len(text), feed):
        tally.feed(text[at : at + feed])
    tally.flush()
    whole = count(text)
    assert tally.at_least <= whole
    if tally.forced == 0:  # every cut where the tokenizer cuts anyway: the sum is the whole's count
        assert tally.tokens == whole


@pytest.mark.parametrize("name", texts_to_count().keys())
def test_the_tally_never_counts_more_than_the_whole_text(engine, name):
    assert_lower_bound(engine.count_tokens, texts_to_count()[name], feed=CHUNK_BYTES // 3)


@pytest.mark.slow
@pytest.mark.parametrize("name", texts_to_count().keys())
def test_the_tally_never_counts_more_than_the_whole_text_with_the_embedded_tokenizer(name):
    loaded = load_model(device="cpu", dtype="float32")
    assert_lower_bound(Engine(loaded).count_tokens, texts_to_count()[name], feed=CHUNK_BYTES // 3)


# --- text and streams -------------------------------------------------------------------------------------------


def test_an_endless_stream_on_stdin_stops_once_it_cannot_fit(engine):
    stream = Endless(b"the keeper logged the ships and the storms. ")

    with pytest.raises(ContextOverflowError, match=r"^the prompt needs at least [\d,]+ tokens") as error:
        read_document("-", stdin=stream, limit=limit_of(engine))

    assert "reading <stdin> stopped after" in str(error.value) and "--truncate middle" in str(error.value)
    assert stream.given <= 4 * CHUNK_BYTES  # the window is 512 tokens: a few chunks settle it


def test_an_endless_stream_with_truncate_is_refused_at_the_stream_cap(engine, monkeypatch):
    monkeypatch.setattr(core.documents, "MAX_STREAM_BYTES", 40 * CHUNK_BYTES)

    with pytest.raises(DocumentError, match=r"^<stdin>: a stream longer than"):
        read_document("-", stdin=Endless(b"words and words "), limit=limit_of(engine, "middle"))


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_a_character_device_is_refused_at_its_first_chunk(device, engine):
    if not Path(device).exists():
        pytest.skip(f"no {device}")
    with pytest.raises(DocumentError, match=rf"^{device}: (binary file|not UTF-8 text)"):
        read_document(device, limit=limit_of(engine))
    with pytest.raises(DocumentError, match=rf"^{device}: (binary file|not UTF-8 text)"):
        read_document(device)  # without a limit too: the first chunk decides


def test_a_fifo_is_read_as_a_stream_under_the_same_bound(tmp_path, engine):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def write_forever():
        try:
            with open(fifo, "wb") as f:
                while True:
                    f.write(b"the keeper logged the ships. " * 1000)
        except (BrokenPipeError, OSError):  # the reader left: what this test wants
            pass

    writer = threading.Thread(target=write_forever, daemon=True)
    writer.start()
    with pytest.raises(ContextOverflowError, match="at least"):
        read_document(str(fifo), limit=limit_of(engine))
    writer.join(timeout=10)
    assert not writer.is_alive()


def test_a_huge_sparse_file_is_refused_without_reading_its_end(tmp_path, engine):
    path = tmp_path / "huge.txt"
    with path.open("wb") as f:
        f.write(words(50_000).encode())
        f.truncate(8 << 30)  # 8 GiB: NUL bytes from here on, which would be refused as binary if read

    with pytest.raises(ContextOverflowError, match="stopped after"):
        read_document(str(path), limit=limit_of(engine))


def test_a_character_split_across_chunks_and_a_late_bad_byte_keep_their_offsets(tmp_path):
    head = b"a" * (CHUNK_BYTES - 1)
    path = tmp_path / "split.txt"
    path.write_bytes(head + "é\r\nline".encode() + b"\r")  # é starts at the chunk's last byte; CR at the end

    assert read_document(str(path)).text == "a" * (CHUNK_BYTES - 1) + "é\nline\r"

    path.write_bytes(head + b"ok " * 30_000 + b"\xff tail")
    with pytest.raises(DocumentError, match=rf"byte 0xff at offset {CHUNK_BYTES - 1 + 90_000}\)"):
        read_document(str(path))


def test_truncate_middle_keeps_the_same_head_and_tail_as_reading_everything(tmp_path, engine):
    path = tmp_path / "long.txt"
    path.write_text("FIRST " + words(200_000) + " LAST")
    limit = limit_of(engine, "middle")

    read = read_document(str(path), limit=limit)
    whole = read_document(str(path))

    assert read.size == whole.size and read.sha256 == whole.sha256
    assert len(read.text) < len(whole.text) / 5 and read.skipped_tokens > 0
    assert read.text.startswith("FIRST ") and read.text.endswith(" LAST")
    fitted, exact = (engine.context([doc], limit.extra, "middle") for doc in (read, whole))
    assert fitted.ids == exact.ids  # the window holds exactly what truncating the whole text keeps
    assert fitted.dropped_estimated and not exact.dropped_estimated
    assert fitted.dropped_tokens == pytest.approx(exact.dropped_tokens, rel=0.05)


def at_least(error: pytest.ExceptionInfo) -> int:
    return int(str(error.value).split("(at least ")[1].split(" ")[0].replace(",", ""))


def test_documents_share_the_limit(tmp_path, engine):
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    small.write_text(words(150))
    big.write_text(words(40_000, seed=1))

    with pytest.raises(ContextOverflowError, match=r"reading .*big\.txt stopped") as alone:
        read_documents([str(big)], limit=limit_of(engine))
    with pytest.raises(ContextOverflowError, match=r"reading .*big\.txt stopped") as after:
        read_documents([str(small), str(big)], limit=limit_of(engine))

    assert at_least(after) - at_least(alone) >= engine.count_tokens(small.read_text()) - 10


# --- PDFs ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def many_pages(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pdf") / "book.pdf"
    pages = [f"Page {i}: the keeper logged {i} ships in the year {1000 + i}." for i in range(2000)]
    path.write_bytes(make_text_pdf(pages))
    return path


def test_a_2000_page_pdf_is_refused_after_a_few_pages(many_pages, engine):
    seen = []

    with pytest.raises(ContextOverflowError, match=r"stopped after page [\d,]+ of 2,000"):
        read_document(str(many_pages), on_page=lambda done, total: seen.append(done), limit=limit_of(engine))

    assert 0 < len(seen) < 200


def test_a_2000_page_pdf_is_truncated_to_its_first_and_last_pages(many_pages, engine):
    limit = limit_of(engine, "middle")
    document = read_document(str(many_pages), limit=limit)

    assert document.pages == 2000 and document.skipped_tokens > 0
    empty = [i for i, (start, end) in enumerate(document.page_spans) if start == end]
    assert 1500 < len(empty) < 2000 and empty == list(range(empty[0], empty[-1] + 1))  # one skipped run
    assert document.text.startswith("Page 0:") and document.text.endswith("in the year 2999.")
    summary = engine_summary(engine, document, limit)
    assert 0 < summary["pages_used"] < 100 and summary["pages"] == 2000


def engine_summary(engine: Engine, document, limit: TokenLimit) -> dict:
    from core.engine import document_summaries

    return document_summaries([document], engine.context([document], limit.extra, "middle"))[0]


# --- the CLI, in a child process: one line, exit 2, bounded memory, time against a small file ---------------------

WRAPPER = """
import resource, subprocess, sys, time
start = time.perf_counter()
with open(sys.argv[1], "rb") as stdin:
    done = subprocess.run(sys.argv[2:], stdin=stdin, capture_output=True, text=True)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(repr((done.returncode, done.stderr, peak, seconds)))
"""


def run_measured(stdin: str, *args) -> tuple[int, str, int, float]:
    """fastkv ARGS with `stdin` in a fresh wrapper process: exit code, stderr, peak RSS (bytes), seconds."""
    command = [*fastkv_command(), *map(str, args)]
    result = subprocess.run(
        [sys.executable, "-c", WRAPPER, stdin, *command], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    return eval(result.stdout.strip().splitlines()[-1])  # noqa: S307 (our own repr of a tuple)


@pytest.fixture(scope="module")
def small_run(tiny_model_folder, tmp_path_factory):
    small = tmp_path_factory.mktemp("small") / "small.txt"
    small.write_text(words(100))
    measured = run_measured(
        "/dev/null", "ask", small, QUESTION, "--model", tiny_model_folder.path, "--max-new-tokens", 4
    )
    assert measured[0] == 0, measured[1]
    return measured


@pytest.mark.parametrize("source", ["/dev/zero", "/dev/urandom", "endless"])
def test_the_cli_refuses_an_endless_input_quickly_in_bounded_memory(source, small_run, tiny_model_folder, tmp_path):
    if source != "endless" and not Path(source).exists():
        pytest.skip(f"no {source}")
    stdin = "/dev/null"
    if source == "endless":  # a FIFO fed without end by a writer thread
        stdin = str(tmp_path / "fifo")
        os.mkfifo(stdin)
        threading.Thread(target=feed_forever, args=(stdin,), daemon=True).start()
    document = source if source != "endless" else "-"

    code, stderr, peak, seconds = run_measured(stdin, "ask", document, QUESTION, "--model", tiny_model_folder.path)

    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("error: ") and ("binary file" in lines[0] or "at least" in lines[0])
    _, _, small_peak, small_seconds = small_run  # the same command answering from a 2 KB file
    assert peak < small_peak + (200 << 20), (peak, small_peak)
    assert seconds < 5 * small_seconds, (seconds, small_seconds)


def feed_forever(path: str) -> None:
    try:
        with open(path, "wb") as f:
            while True:
                f.write(b"the keeper logged the ships and the storms. " * 1000)
    except OSError:
        pass


def test_the_cli_truncates_a_large_file_in_memory_that_does_not_follow_its_size(small_run, tiny_model_folder, tmp_path):
    big = tmp_path / "big.txt"
    line = (words(2000) + "\n").encode()
    with big.open("wb") as f:
        for _ in range((256 << 20) // len(line)):  # 256 MB
            f.write(line)

    code, stderr, peak, _ = run_measured(
        "/dev/null", "ask", big, QUESTION, "--model", tiny_model_folder.path, "--truncate", "middle",
        "--max-new-tokens", 4, "--json",
    )  # fmt: skip

    assert code == 0, stderr
    assert peak < small_run[2] + (100 << 20), (peak, small_run[2])  # far below the file's 256 MB


def test_the_cli_reports_pages_used_and_an_estimated_drop(many_pages, tiny_model_folder):
    result = fastkv(
        "ask", many_pages, QUESTION, "--model", tiny_model_folder.path, "--truncate", "middle", "--max-new-tokens", 4,
        "--json", "--quiet",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    [document] = data["documents"]
    assert document["pages"] == 2000 and 0 < document["pages_used"] < 100
    assert data["stats"]["dropped_tokens_estimated"] and data["stats"]["dropped_tokens"] > 10_000


def test_the_cli_refuses_a_2000_page_pdf_in_one_line(many_pages, tiny_model_folder):
    result = fastkv("ask", many_pages, QUESTION, "--model", tiny_model_folder.path)
    assert_one_line_error(result, "at least", "of 2,000", "--truncate middle")


def test_cache_build_reads_under_the_same_bound(tiny_model_folder, tmp_path):
    output = tmp_path / "c.fkv"
    result = fastkv("cache", "build", "-", "-o", output, "--model", tiny_model_folder.path, input=words(400_000))

    assert_one_line_error(result, "at least", "reading <stdin> stopped after", "--truncate middle")
    assert not output.exists()
