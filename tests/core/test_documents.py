"""Tests for core.documents: text, PDF and stdin reading, and one clear error per bad input."""

import hashlib
import io
import logging
import os
import re
from pathlib import Path

import pytest

import core.documents
from core.documents import Document, read_document, read_documents
from core.errors import DocumentError, InputError
from tests.pdfs import make_blank_pdf, make_encrypted_pdf, make_text_pdf

PAGE_TEXTS = [
    "The harbour master logged 41 ships in March.",
    "Page two: the keeper was Ada Lindqvist (1921-1958).",
    "Final page.\nThe lamp burned paraffin until 1962.",
]


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- text --------------------------------------------------------------------------------------


def test_text_file_round_trip(tmp_path):
    raw = "Line one.\nZweite Zeile: größer.\n日本語\n".encode()
    path = write(tmp_path, "notes.txt", raw)

    doc = read_document(path)

    assert doc == Document(
        name=path,
        text=raw.decode(),
        sha256=sha(raw),
        size=len(raw),
        page_spans=((0, len(raw.decode())),),
    )
    assert doc.pages == 1


def test_any_suffix_is_read_as_text(tmp_path):
    path = write(tmp_path, "README", b"# heading\nbody")
    assert read_document(path).text == "# heading\nbody"


def test_crlf_normalised_and_bom_stripped_but_hash_is_of_raw_bytes(tmp_path):
    raw = b"\xef\xbb\xbfalpha\r\nbeta\r\n\r\ngamma"
    path = write(tmp_path, "windows.md", raw)

    doc = read_document(path)

    assert doc.text == "alpha\nbeta\n\ngamma"
    assert doc.sha256 == sha(raw)
    assert doc.size == len(raw)
    assert doc.page_spans == ((0, len(doc.text)),)


def test_stdin_text():
    raw = b"from a pipe\r\n"
    doc = read_document("-", stdin=io.BytesIO(raw))
    assert (doc.name, doc.text, doc.sha256, doc.size) == (
        "<stdin>",
        "from a pipe\n",
        sha(raw),
        13,
    )


# --- PDF ---------------------------------------------------------------------------------------


def test_pdf_pages_text_spans_and_progress(tmp_path):
    raw = make_text_pdf(PAGE_TEXTS)
    path = write(tmp_path, "report.pdf", raw)
    progress = []

    doc = read_document(path, on_page=lambda done, total: progress.append((done, total)))

    assert doc.pages == 3
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert (doc.sha256, doc.size) == (sha(raw), len(raw))
    page_texts = [doc.text[start:end] for start, end in doc.page_spans]
    assert page_texts == PAGE_TEXTS
    assert doc.text == "\n\n".join(PAGE_TEXTS)
    ends = [0] + [end for _, end in doc.page_spans]
    assert all(ends[i] <= start for i, (start, _) in enumerate(doc.page_spans))
    assert doc.page_spans[-1][1] == len(doc.text)


def test_pdf_suffix_is_case_insensitive(tmp_path):
    # no %PDF- magic: only the suffix can send it to the PDF reader, which then refuses it
    path = write(tmp_path, "SCAN.PDF", b"plain words, not a PDF")
    with pytest.raises(DocumentError, match=r"SCAN\.PDF: not a readable PDF \(no %PDF- header\)$"):
        read_document(path)


def test_pdf_on_stdin_recognised_by_magic():
    doc = read_document("-", stdin=io.BytesIO(make_text_pdf(PAGE_TEXTS)))
    assert doc.name == "<stdin>"
    assert doc.pages == 3
    assert doc.text[slice(*doc.page_spans[1])] == PAGE_TEXTS[1]


def test_pdf_encrypted_with_empty_user_password_is_read(tmp_path):
    path = write(tmp_path, "open.pdf", make_encrypted_pdf(user_password=""))
    doc = read_document(path)
    assert doc.pages == 2
    assert "Classified page two." in doc.text


def test_recoverable_pdf_defects_do_not_log_warnings(tmp_path, caplog):
    raw = re.sub(rb"startxref\n\d+", b"startxref\n12", make_text_pdf(PAGE_TEXTS))
    path = write(tmp_path, "damaged.pdf", raw)
    caplog.set_level(logging.DEBUG)
    level_before = logging.getLogger("pypdf").level

    doc = read_document(path)

    assert doc.pages == 3
    assert not [record for record in caplog.records if record.name.startswith("pypdf")]
    assert logging.getLogger("pypdf").level == level_before


# --- several documents -------------------------------------------------------------------------


def test_read_documents_keeps_order_and_reads_stdin_once(tmp_path):
    first = write(tmp_path, "a.txt", b"first")
    second = write(tmp_path, "b.pdf", make_text_pdf(["second"]))

    docs = read_documents([first, "-", second], stdin=io.BytesIO(b"middle"))

    assert [d.name for d in docs] == [first, "<stdin>", second]
    assert [d.text for d in docs] == ["first", "middle", "second"]


def test_stdin_twice_is_refused():
    with pytest.raises(DocumentError, match="stdin"):
        read_documents(["-", "-"], stdin=io.BytesIO(b"text"))


# --- bad input ---------------------------------------------------------------------------------

BAD_FILES = {
    "empty": ("empty.txt", b"", "the file is empty"),
    "whitespace": ("blank.txt", b" \r\n\t\n  ", "the file is empty"),
    "non-utf8": (
        "blob.bin",
        b"\x89PNG\r\n\x1a\n",
        "not UTF-8 text (byte 0x89 at offset 0); fastkv reads UTF-8 text and PDF files",
    ),
    "latin-1 after bom": ("old.txt", b"\xef\xbb\xbfcaf\xe9", "byte 0xe9 at offset 6"),
    "nul bytes": ("data.txt", b"abc\x00def", "binary file"),
    "utf-16": ("wide.txt", "hi".encode("utf-16"), "UTF-16"),
    "encrypted": ("secret.pdf", make_encrypted_pdf(), "the PDF is encrypted"),
    "no text": (
        "scan.pdf",
        make_blank_pdf(),
        "the PDF has no extractable text (scanned images?); run OCR first",
    ),
    "garbage pdf": (
        "broken.pdf",
        b"%PDF-1.7\n" + b"\xde\xad garbage " * 50,
        "not a readable PDF (",
    ),
    "truncated pdf": (
        "cut.pdf",
        make_text_pdf(PAGE_TEXTS)[:300],
        "not a readable PDF (",
    ),
}


@pytest.mark.parametrize("case", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_file_raises_one_line_naming_file_and_cause(tmp_path, case):
    name, data, cause = case
    path = write(tmp_path, name, data)

    with pytest.raises(DocumentError) as info:
        read_document(path)

    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert cause in message
    assert "\n" not in message
    assert isinstance(info.value, InputError)


def test_missing_file(tmp_path):
    path = str(tmp_path / "report.pdf")
    with pytest.raises(DocumentError, match=rf"^{re.escape(path)}: no such file$"):
        read_document(path)


def test_directory(tmp_path):
    path = str(tmp_path / "docs")
    os.mkdir(path)
    with pytest.raises(DocumentError, match=rf"^{re.escape(path)}: is a directory, not a document$"):
        read_document(path)


def test_permission_denied_is_reported(tmp_path, monkeypatch):
    path = write(tmp_path, "locked.txt", b"text")

    def deny(file, mode="r"):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(core.documents, "open", deny, raising=False)  # shadows the builtin there only
    with pytest.raises(DocumentError, match=rf"^{re.escape(path)}: permission denied$"):
        read_document(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file_on_disk(tmp_path):
    path = write(tmp_path, "locked.txt", b"text")
    os.chmod(path, 0)
    with pytest.raises(DocumentError, match="permission denied"):
        read_document(path)


def test_empty_stdin():
    with pytest.raises(DocumentError, match=r"^<stdin>: the input is empty$"):
        read_document("-", stdin=io.BytesIO(b""))


def test_encrypted_pdf_on_stdin():
    with pytest.raises(DocumentError, match=r"^<stdin>: the PDF is encrypted$"):
        read_document("-", stdin=io.BytesIO(make_encrypted_pdf()))
