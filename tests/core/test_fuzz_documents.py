"""Fuzzing document input: random bytes, broken PDFs, huge lines, NUL bytes and mixed encodings are
each read, or refused with DocumentError; nothing raises anything else, nothing hangs."""

import hashlib
import io
import random
import signal
import time
from contextlib import contextmanager

import pytest
from pypdf import PdfReader, PdfWriter

from core.documents import Document, read_document
from core.errors import DocumentError
from tests.pdfs import make_encrypted_pdf, make_text_pdf

SEED = 6
MUTANTS = 1200  # ~8 s on one idle core
DEADLINE_S = 45  # stop early on a slow machine; the count is reported either way
SLOW_CASE_S = 10  # one document taking longer than this counts as a hang
PAGES = [
    "The harbour master logged 41 ships in March.\nThe lamp burned colza oil.",
    "Page two: the keeper was Ada Lindqvist (1921-1958).",
    "Final page.\nThe lamp burned paraffin until 1962. (Parentheses) and \\backslashes\\.",
]


class Hang(BaseException):
    """Raised by the alarm: a BaseException, so pypdf's boundary (`except Exception`) cannot swallow it."""


@contextmanager
def time_limit(seconds: float):
    def alarm(signum, frame):
        raise Hang()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def compressed_pdf(pages: list[str]) -> bytes:
    """The same text with Flate-compressed content streams (exercises pypdf's decoders)."""
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_text_pdf(pages))))
    for page in writer.pages:
        page.compress_content_streams()
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


@pytest.fixture(scope="module")
def pdfs() -> list[bytes]:
    return [make_text_pdf(PAGES), compressed_pdf(PAGES), make_encrypted_pdf(""), make_encrypted_pdf()]


# --- mutations of a PDF ---------------------------------------------------------------------------------


def truncate(rng, data):
    return data[: rng.randrange(len(data))]


def flip_bytes(rng, data):
    data = bytearray(data)
    for _ in range(rng.choice([1, 2, 8, 32])):
        data[rng.randrange(len(data))] ^= rng.randint(1, 255)
    return bytes(data)


def delete_range(rng, data):
    start = rng.randrange(len(data))
    return data[:start] + data[start + rng.randint(1, 200) :]


def duplicate_range(rng, data):
    start = rng.randrange(len(data))
    end = min(len(data), start + rng.randint(1, 400))
    return data[:end] + data[start:end] * rng.choice([1, 2, 50]) + data[end:]


def insert_bytes(rng, data):
    at = rng.randrange(len(data))
    return data[:at] + rng.randbytes(rng.randint(1, 64)) + data[at:]


def rewrite_number(rng, data):
    """Change one number (an object id, a /Length, an xref offset, a /Count) to another."""
    digits = [i for i in range(len(data)) if 48 <= data[i] <= 57]
    at = rng.choice(digits)
    new = str(rng.choice([0, -1, 1, 2**31, 10**12, rng.randint(0, 5000)])).encode()
    return data[:at] + new + data[at + 1 :]


def rewrite_token(rng, data):
    """Swap a PDF keyword for another (obj/endobj, stream/endstream, R, /Type values, /Filter names)."""
    tokens = [b"obj", b"endobj", b"stream", b"endstream", b" R", b"/Page", b"/Pages", b"/Kids", b"/Count",
              b"/Length", b"/Filter", b"/FlateDecode", b"/Root", b"xref", b"trailer", b"startxref", b"<<", b">>"]  # fmt: skip
    old, new = rng.choice(tokens), rng.choice(tokens + [b"", b"/ASCIIHexDecode", b"/LZWDecode", b"[[[[", b"9999 0 R"])
    return data.replace(old, new, rng.choice([1, -1]))


def splice(rng, data, other):
    return data[: rng.randrange(len(data))] + other[rng.randrange(len(other)) :]


PDF_MUTATIONS = [truncate, flip_bytes, delete_range, duplicate_range, insert_bytes, rewrite_number, rewrite_token]


def mutate_pdf(rng: random.Random, pdfs: list[bytes]) -> bytes:
    data = rng.choice(pdfs)
    for _ in range(rng.choice([1, 1, 2, 3])):
        if not data:
            break
        data = splice(rng, data, rng.choice(pdfs)) if rng.random() < 0.05 else rng.choice(PDF_MUTATIONS)(rng, data)
    return data


# --- other inputs -----------------------------------------------------------------------------------------


def random_input(rng: random.Random) -> bytes:
    """Random bytes, sometimes behind a PDF header; random code points as UTF-8; broken encodings."""
    kind = rng.randrange(7)
    if kind == 0:
        return rng.randbytes(rng.choice([1, 7, 100, 4096]))
    if kind == 1:
        return b"%PDF-1." + rng.randbytes(rng.randint(0, 2000))
    if kind == 2:
        text = "".join(chr(rng.choice([rng.randint(32, 0x7E), rng.randint(0xA0, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                       for _ in range(rng.randint(1, 300)))  # fmt: skip
        return text.encode("utf-8")
    if kind == 3:  # latin-1 bytes inside UTF-8
        return "café, naïve, Zürich: ".encode() + "déjà vu".encode("latin-1") + b" more text"
    if kind == 4:  # UTF-16, with or without a byte-order mark
        return "Keeper's log".encode(rng.choice(["utf-16", "utf-16-le", "utf-16-be"]))
    if kind == 5:  # encodings UTF-8 forbids: overlong, surrogate halves, past U+10FFFF, lone continuation bytes
        return (
            b"text " + rng.choice([b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xe2\x82"]) + b" end"
        )
    return b"line one\r\nline two\x00 with a NUL\n"


# --- the check --------------------------------------------------------------------------------------------


def assert_document(document: Document, data: bytes) -> None:
    assert document.sha256 == hashlib.sha256(data).hexdigest() and document.size == len(data)
    assert document.pages >= 1 and document.text.strip()
    for start, end in document.page_spans:
        assert 0 <= start <= end <= len(document.text)


def outcome(data: bytes, tmp_path, rng: random.Random) -> str:
    """Read `data` from a file (.pdf or .txt) or stdin: "read" or "refused"; anything else escapes."""
    source = rng.choice(["pdf", "txt", "stdin"])
    with time_limit(SLOW_CASE_S):
        try:
            if source == "stdin":
                document = read_document("-", stdin=io.BytesIO(data))
            else:
                path = tmp_path / f"input.{source}"
                path.write_bytes(data)
                document = read_document(str(path))
        except DocumentError as error:
            assert "\n" not in str(error), str(error)
            return "refused"
    assert_document(document, data)
    return "read"


def test_every_broken_document_is_read_or_refused(pdfs, tmp_path, record_property):
    rng = random.Random(SEED)
    counts, crashes = {"read": 0, "refused": 0}, []
    for pdf in pdfs[:3]:  # control: the intact PDFs are read
        assert outcome(pdf, tmp_path, random.Random(0)) == "read"
    start, tried = time.perf_counter(), 0
    while tried < MUTANTS and time.perf_counter() - start < DEADLINE_S:
        data = mutate_pdf(rng, pdfs) if rng.random() < 0.8 else random_input(rng)
        tried += 1
        try:
            counts[outcome(data, tmp_path, rng)] += 1
        except Hang:
            crashes.append(f"{len(data)} bytes starting {data[:20]!r}: took over {SLOW_CASE_S} s")
        except Exception as error:  # the failure this test exists to find
            crashes.append(f"{len(data)} bytes starting {data[:20]!r}: {type(error).__name__}: {str(error)[:200]}")
    seconds = time.perf_counter() - start
    summary = f"{tried} inputs in {seconds:.1f} s: {counts['read']} read, {counts['refused']} refused"
    print(f"\ndocument fuzz: {summary}")
    record_property("mutants", tried)
    assert not crashes, f"{summary}; {len(crashes)} did something else, e.g.:\n" + "\n".join(crashes[:10])
    assert tried >= 300 and counts["read"] > 0 and counts["refused"] > 0, summary


@pytest.mark.parametrize(
    ("name", "data", "cause"),
    [
        ("nul.txt", b"abc\x00def", "binary file (NUL byte at offset 3)"),
        ("latin1.txt", "Zürich ".encode() + "déjà".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 9)"),
        ("utf16-bom.txt", "Keeper".encode("utf-16"), "UTF-16 text"),
        ("utf16-le.txt", "Keeper".encode("utf-16-le"), "binary file (NUL byte at offset 1)"),
        ("overlong.txt", b"a\xc0\xafb", "not UTF-8 text (byte 0xc0 at offset 1)"),
        ("surrogate.txt", b"a\xed\xa0\x80b", "not UTF-8 text (byte 0xed at offset 1)"),
    ],
)
def test_mixed_and_foreign_encodings_are_refused_naming_the_byte(tmp_path, name, data, cause):
    path = tmp_path / name
    path.write_bytes(data)

    with pytest.raises(DocumentError) as error:
        read_document(str(path))

    assert str(error.value).startswith(f"{path}: {cause}")


def test_a_20_mb_single_line_is_read_whole(tmp_path):
    line = ("The keeper logged the ships, the storms and the oil. " * 400_000)[: 20 * 10**6].encode()
    path = tmp_path / "one-line.txt"
    path.write_bytes(line)

    start = time.perf_counter()
    document = read_document(str(path))

    assert time.perf_counter() - start < 10
    assert document.size == len(line) and "\n" not in document.text
    assert document.text == line.decode().strip()
    assert document.page_spans == ((0, len(document.text)),)
