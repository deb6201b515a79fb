"""Read text files, PDFs and stdin into plain `Document` data; bad input: DocumentError."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from core.errors import DocumentError

if TYPE_CHECKING:
    from pypdf import PdfReader

STDIN_PATH = "-"
STDIN_NAME = "<stdin>"
PDF_MAGIC = b"%PDF-"
PAGE_SEPARATOR = "\n\n"
UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
SUPPORTED = "fastkv reads UTF-8 text and PDF files"
PDF_HEADER_SEARCH = 1024  # readers accept the %PDF- header anywhere in the first 1 KiB
MAX_REASON_CHARS = 120

PageCallback = Callable[[int, int], None]  # on_page(done, total)


@dataclass(frozen=True)
class Document:
    """One document as text, with where it came from and where each page lies in `text`."""

    name: str  # the path as given by the user, or "<stdin>"
    text: str  # full text; PDF pages joined with "\n\n"
    sha256: str  # hex sha256 of the raw input bytes
    size: int  # number of raw bytes
    page_spans: tuple[tuple[int, int], ...]  # (start, end) of each page in `text`

    @property
    def pages(self) -> int:
        return len(self.page_spans)


def read_document(path: str, stdin: BinaryIO | None = None, on_page: PageCallback | None = None) -> Document:
    """Read one document: `path` "-" reads all of `stdin` (default: the process's stdin).

    PDFs are recognised by a `.pdf` suffix or by the `%PDF-` magic bytes (so a PDF on stdin works);
    everything else must be UTF-8 text. `on_page(done, total)` reports progress through a PDF.
    """
    if not path:
        raise DocumentError("'': an empty path is not a document")
    if path == STDIN_PATH:
        name, data = STDIN_NAME, _read_stdin(stdin)
    else:
        name, data = path, _read_file(path)
    if not data:
        raise DocumentError(_empty_message(name))
    if _looks_like_pdf(path, data):
        pages = _pdf_pages(name, data, on_page)
    else:
        pages = [_decode_text(name, data)]
    return _build_document(name, data, pages)


def read_documents(
    paths: Sequence[str],
    stdin: BinaryIO | None = None,
    on_page: PageCallback | None = None,
) -> list[Document]:
    """Read several documents in order; stdin ("-") may appear at most once."""
    if sum(path == STDIN_PATH for path in paths) > 1:
        raise DocumentError(f"{STDIN_PATH}: stdin can be read only once; give '-' a single time")
    return [read_document(path, stdin=stdin, on_page=on_page) for path in paths]


def _read_stdin(stdin: BinaryIO | None) -> bytes:
    stream = stdin if stdin is not None else getattr(sys.stdin, "buffer", None)
    if stream is None:  # the process was started with stdin closed
        return b""
    try:
        return stream.read()
    except OSError as exc:
        raise DocumentError(f"{STDIN_NAME}: cannot read ({exc.strerror or exc})") from exc


def _read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise DocumentError(f"{path}: no such file") from exc
    except (IsADirectoryError, PermissionError) as exc:
        # Windows reports reading a directory as a permission error
        if Path(path).is_dir():
            raise DocumentError(f"{path}: is a directory, not a document") from exc
        raise DocumentError(f"{path}: permission denied") from exc
    except OSError as exc:
        raise DocumentError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _empty_message(name: str) -> str:
    return f"{name}: {'the input' if name == STDIN_NAME else 'the file'} is empty"


def _looks_like_pdf(path: str, data: bytes) -> bool:
    return path.lower().endswith(".pdf") or data.startswith(PDF_MAGIC)


def _decode_text(name: str, data: bytes) -> str:
    """Strict UTF-8 (a leading BOM dropped), CRLF -> LF; binary or non-UTF-8 bytes are refused."""
    if data.startswith(UTF16_BOMS):
        raise DocumentError(f"{name}: UTF-16 text; convert it to UTF-8 first ({SUPPORTED})")
    if b"\x00" in data:
        offset = data.index(b"\x00")
        raise DocumentError(f"{name}: binary file (NUL byte at offset {offset}); {SUPPORTED}")
    body_start = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    try:
        text = data[body_start:].decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        offset = body_start + exc.start
        raise DocumentError(
            f"{name}: not UTF-8 text (byte 0x{data[offset]:02x} at offset {offset}); {SUPPORTED}"
        ) from exc
    text = _normalise_newlines(text)
    if not text.strip():
        raise DocumentError(_empty_message(name) + " (only whitespace)")
    return text


def _normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n")


@contextlib.contextmanager
def _quiet_pypdf() -> Iterator[None]:
    """Silence pypdf's logged warnings (it logs one per recoverable defect) and restore after."""
    logger = logging.getLogger("pypdf")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _pdf_pages(name: str, data: bytes, on_page: PageCallback | None) -> list[str]:
    """Extract the text of every page; refuse encrypted, unreadable and text-less PDFs."""
    if PDF_MAGIC not in data[:PDF_HEADER_SEARCH]:
        raise DocumentError(f"{name}: not a readable PDF (no %PDF- header)")
    with _quiet_pypdf():
        reader = _open_pdf(name, data)
        total = _page_count(name, reader)
        pages = []
        for index in range(total):
            pages.append(_page_text(name, reader, index))
            if on_page is not None:
                on_page(index + 1, total)
    if not any(page.strip() for page in pages):
        raise DocumentError(f"{name}: the PDF has no extractable text (scanned images?); run OCR first")
    return pages


def _open_pdf(name: str, data: bytes) -> PdfReader:
    """Open the PDF from memory; an encrypted one is opened only if the empty password works."""
    from pypdf import PdfReader  # imported here: ~0.1 s, and only PDFs need it
    from pypdf.errors import DependencyError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocumentError(f"{name}: the PDF is encrypted")
    except DocumentError:
        raise
    except DependencyError as exc:
        raise DocumentError(f"{name}: the PDF is encrypted ({_short_reason(exc)})") from exc
    # pypdf raises many exception types on corrupt input; this is its boundary
    except Exception as exc:
        raise DocumentError(f"{name}: not a readable PDF ({_short_reason(exc)})") from exc
    return reader


def _page_count(name: str, reader: PdfReader) -> int:
    try:
        total = len(reader.pages)
    # pypdf boundary: a broken page tree
    except Exception as exc:
        raise DocumentError(f"{name}: not a readable PDF ({_short_reason(exc)})") from exc
    if total == 0:
        raise DocumentError(f"{name}: not a readable PDF (no pages found)")
    return total


def _page_text(name: str, reader: PdfReader, index: int) -> str:
    from pypdf.errors import DependencyError

    try:
        text = reader.pages[index].extract_text()
    except DependencyError as exc:
        raise DocumentError(f"{name}: the PDF is encrypted ({_short_reason(exc)})") from exc
    # pypdf boundary: a broken page or content stream
    except Exception as exc:
        reason = f"page {index + 1}: {_short_reason(exc)}"
        raise DocumentError(f"{name}: not a readable PDF ({reason})") from exc
    return _normalise_newlines(text or "").rstrip()


def _short_reason(exc: BaseException) -> str:
    """One short line describing `exc`, for the parenthesis of an error message."""
    lines = str(exc).strip().splitlines()
    reason = lines[0] if lines else type(exc).__name__
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 3] + "..."
    return reason


def _build_document(name: str, data: bytes, pages: list[str]) -> Document:
    spans = []
    start = 0
    for page in pages:
        spans.append((start, start + len(page)))
        start += len(page) + len(PAGE_SEPARATOR)
    return Document(
        name=name,
        text=PAGE_SEPARATOR.join(pages),
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        page_spans=tuple(spans),
    )
