"""Read text files, PDFs and stdin into plain `Document` data; bad input: DocumentError."""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import logging
import os
import stat
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from core.errors import ContextOverflowError, DocumentError
from core.token_limit import FORCED_CUT_SLACK, TokenLimit, TokenTally

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
CHUNK_BYTES = 1 << 16  # read at a time; the first chunk decides PDF or text, UTF-16, binary
MAX_STREAM_BYTES = 16 << 30  # a stream (stdin, FIFO, device) read to its end stops here
SPOOL_BYTES = 32 << 20  # a PDF from a stream is kept in memory up to this, then in a temp file

PageCallback = Callable[[int, int], None]  # on_page(done, total)


@dataclass(frozen=True)
class Document:
    """One document as text, with where it came from and where each page lies in `text`."""

    name: str  # the path as given by the user, or "<stdin>"
    text: str  # full text; PDF pages joined with "\n\n"
    sha256: str  # hex sha256 of the raw input bytes
    size: int  # number of raw bytes
    page_spans: tuple[tuple[int, int], ...]  # (start, end) of each page in `text`; (p, p): a page skipped
    skipped_tokens: int = 0  # about how many tokens of its middle were never kept (TokenLimit.truncate)

    @property
    def pages(self) -> int:
        return len(self.page_spans)


def read_document(
    path: str, stdin: BinaryIO | None = None, on_page: PageCallback | None = None, limit: TokenLimit | None = None
) -> Document:
    """Read one document: `path` "-" reads `stdin` (default: the process's stdin).

    PDFs are recognised by a `.pdf` suffix or by the `%PDF-` magic bytes (so a PDF on stdin works);
    everything else must be UTF-8 text. `on_page(done, total)` reports progress through a PDF.
    With a `limit`, reading stops with ContextOverflowError once the document cannot fit it, or
    (limit.truncate) skips its middle; a stream read to its end stops at MAX_STREAM_BYTES.
    """
    return _read(path, stdin, on_page, limit, used=0)[0]


def read_document_data(
    name: str, data: bytes, on_page: PageCallback | None = None, limit: TokenLimit | None = None
) -> Document:
    """A document whose bytes were read elsewhere (on another machine), read as `read_document(name)`
    would read the file: the same text, pages and sha256."""
    return _read_source(name, _Source(name, io.BytesIO(data)), on_page, limit, used=0)[0]


def read_documents(
    paths: Sequence[str],
    stdin: BinaryIO | None = None,
    on_page: PageCallback | None = None,
    limit: TokenLimit | None = None,
) -> list[Document]:
    """Read several documents in order; stdin ("-") may appear at most once. A `limit` is shared:
    reading stops once the documents together cannot fit it."""
    if sum(path == STDIN_PATH for path in paths) > 1:
        raise DocumentError(f"{STDIN_PATH}: stdin can be read only once; give '-' a single time")
    documents, used = [], 0
    for path in paths:
        document, tokens = _read(path, stdin, on_page, limit, used)
        documents.append(document)
        used += max(tokens - FORCED_CUT_SLACK, 0)  # documents are joined: a cut between them
    return documents


def _read(
    path: str, stdin: BinaryIO | None, on_page: PageCallback | None, limit: TokenLimit | None, used: int
) -> tuple[Document, int]:
    """-> the document and the tokens it certainly has (0 without a limit)."""
    if not path:
        raise DocumentError("'': an empty path is not a document")
    if path == STDIN_PATH:
        stream = stdin if stdin is not None else getattr(sys.stdin, "buffer", None)
        source = _Source(STDIN_NAME, stream)
        return _read_source(path, source, on_page, limit, used)
    with _open(path) as file:
        return _read_source(path, _Source(path, file), on_page, limit, used)


def _read_source(
    path: str, source: _Source, on_page: PageCallback | None, limit: TokenLimit | None, used: int
) -> tuple[Document, int]:
    if not source.first:
        raise DocumentError(_empty_message(source.name))
    if _looks_like_pdf(path, source.first):
        return _read_pdf(source, on_page, limit, used)
    return _read_text(source, limit, used)


def _open(path: str) -> BinaryIO:
    """Open a document for reading in binary (a FIFO blocks here until a writer opens it, as `cat` does)."""
    try:
        return open(path, "rb")  # noqa: SIM115 (the caller closes it)
    except FileNotFoundError as exc:
        raise DocumentError(f"{path}: no such file") from exc
    except (IsADirectoryError, PermissionError) as exc:
        # Windows reports reading a directory as a permission error
        if os.path.isdir(path):
            raise DocumentError(f"{path}: is a directory, not a document") from exc
        raise DocumentError(f"{path}: permission denied") from exc
    except OSError as exc:
        raise DocumentError(f"{path}: cannot read ({exc.strerror or exc})") from exc


class _Source:
    """An open input read in chunks, hashed and counted as it goes; the first chunk is read at once."""

    def __init__(self, name: str, stream: BinaryIO | None):
        self.name, self.stream, self.size, self.digest = name, stream, 0, hashlib.sha256()
        self.regular = _is_regular(stream)
        self.first = self.read() if stream is not None else b""  # None: started with stdin closed

    def read(self) -> bytes:
        try:
            data = self.stream.read(CHUNK_BYTES)
        except OSError as exc:
            raise DocumentError(f"{self.name}: cannot read ({exc.strerror or exc})") from exc
        except ValueError as exc:  # a closed file object
            raise DocumentError(f"{self.name}: cannot read ({exc})") from exc
        self.size += len(data)
        self.digest.update(data)
        if not self.regular and self.size > MAX_STREAM_BYTES:
            raise DocumentError(
                f"{self.name}: a stream longer than {MAX_STREAM_BYTES >> 30} GiB (endless?); "
                "save the part to read into a file"
            )
        return data

    def chunks(self) -> Iterator[bytes]:
        first, self.first = self.first, b""
        if first:
            yield first
        while data := self.read():
            yield data


def _is_regular(stream: BinaryIO | None) -> bool:
    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (AttributeError, OSError, ValueError):  # BytesIO, a pipe-less test stream: a stream
        return False


def _empty_message(name: str) -> str:
    return f"{name}: {'the input' if name == STDIN_NAME else 'the file'} is empty"


def _looks_like_pdf(path: str, data: bytes) -> bool:
    return path.lower().endswith(".pdf") or data.startswith(PDF_MAGIC)


def _text(name: str, chunks: Iterator[bytes]) -> Iterator[str]:
    """Strict UTF-8 (a leading BOM dropped), CRLF -> LF, decoded as the chunks arrive; binary or
    non-UTF-8 bytes are refused at the first chunk holding them."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset, held = 0, ""  # raw bytes before this chunk; a "\r" that may start a "\r\n"
    for data in chunks:
        if offset == 0:
            if data.startswith(UTF16_BOMS):
                raise DocumentError(f"{name}: UTF-16 text; convert it to UTF-8 first ({SUPPORTED})")
            if data.startswith(UTF8_BOM):
                data, offset = data[len(UTF8_BOM) :], len(UTF8_BOM)
        if (nul := data.find(b"\x00")) >= 0:
            raise DocumentError(f"{name}: binary file (NUL byte at offset {offset + nul}); {SUPPORTED}")
        text = _decode(name, decoder, data, offset)
        offset += len(data)
        text, held = _split_held(held + text)
        yield _normalise_newlines(text)
    yield held + _decode(name, decoder, b"", offset, final=True)


def _decode(name: str, decoder: codecs.IncrementalDecoder, data: bytes, offset: int, final: bool = False) -> str:
    buffered = len(decoder.getstate()[0])  # the start of a character split across chunks
    try:
        return decoder.decode(data, final)
    except UnicodeDecodeError as exc:
        at = offset - buffered + exc.start
        raise DocumentError(
            f"{name}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {at}); {SUPPORTED}"
        ) from exc


def _split_held(text: str) -> tuple[str, str]:
    return (text[:-1], "\r") if text.endswith("\r") else (text, "")


def _read_text(source: _Source, limit: TokenLimit | None, used: int) -> tuple[Document, int]:
    """All of a text input; with a limit, as far as it can fit, or its head and tail (truncate)."""
    head: list[str] = []
    tally = TokenTally(limit.count) if limit else None
    tail: deque[str] = deque()
    tail_chars = skipped_chars = 0
    has_text = False
    for text in _text(source.name, source.chunks()):
        has_text = has_text or bool(text.strip())
        if tally is None or limit.truncate is None or tally.at_least < limit.room:
            head.append(text)
            if tally is not None:
                tally.feed(text)
                _check_fits(source, limit, used + tally.at_least)
            continue
        # truncate: the head holds `room` tokens; keep a tail that surely does too, skip the middle
        tail.append(text)
        tail_chars += len(text)
        while tail_chars - len(tail[0]) >= limit.room * limit.longest_token:
            skipped_chars += len(tail[0])
            tail_chars -= len(tail.popleft())
    if not has_text:
        raise DocumentError(_empty_message(source.name) + (" (only whitespace)" if source.size else ""))
    if tally is not None:
        tally.flush()  # read whole, so the prompt's exact count decides whether it fits
    text = "".join(head) + "".join(tail)
    skipped = tally.estimate(skipped_chars) if tally is not None else 0
    document = Document(
        source.name, text, source.digest.hexdigest(), source.size, ((0, len(text)),), skipped_tokens=skipped
    )
    return document, tally.at_least if tally is not None else 0


def _check_fits(source: _Source, limit: TokenLimit, tokens: int, where: str = "") -> None:
    """Refuse, once they certainly have more tokens than the window leaves them, documents not truncated."""
    if tokens <= limit.room or limit.truncate is not None:
        return
    raise ContextOverflowError(
        f"the prompt needs at least {tokens + limit.extra:,} tokens (at least {tokens:,} of documents: reading "
        f"{source.name} stopped after {where or f'{source.size:,} bytes'}; and {limit.extra:,} for the question and answer) but "
        f"the model's window is {limit.window:,}; pass --truncate middle to drop at least "
        f"{tokens + limit.extra - limit.window:,} tokens from the middle of the documents"
    )


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


def _read_pdf(
    source: _Source, on_page: PageCallback | None, limit: TokenLimit | None, used: int
) -> tuple[Document, int]:
    """Extract page text lazily: all pages; with a limit, until the pages cannot fit, or (truncate) a head
    and a tail of pages that fill the window, skipping the pages between; refuse encrypted, unreadable
    and text-less PDFs."""
    if PDF_MAGIC not in source.first[:PDF_HEADER_SEARCH]:
        raise DocumentError(f"{source.name}: not a readable PDF (no %PDF- header)")
    with _seekable(source) as file, _quiet_pypdf():
        reader = _open_pdf(source.name, file)
        total = _page_count(source.name, reader)
        pages: list[str | None] = [None] * total
        tally = TokenTally(limit.count) if limit else None
        front, back = 0, total
        while front < back and (tally is None or limit.truncate is None or tally.at_least < limit.room):
            pages[front] = _page_text(source.name, reader, front)
            if tally is not None:
                tally.feed((PAGE_SEPARATOR if front else "") + pages[front])
                _check_fits(source, limit, used + tally.at_least, f"page {front + 1:,} of {total:,}")
            front += 1
            if on_page is not None:
                on_page(front, total)
        tail_tokens = 0
        while front < back and tail_tokens < limit.room:  # truncate: a tail of pages as long as the head
            back -= 1
            pages[back] = _page_text(source.name, reader, back)
            tail_tokens += max(limit.count(pages[back]) - FORCED_CUT_SLACK, 0)
        if on_page is not None and front < total:
            on_page(total, total)
        _finish(source, file)
    if not any(page and page.strip() for page in pages):
        raise DocumentError(f"{source.name}: the PDF has no extractable text (scanned images?); run OCR first")
    tokens = 0
    if tally is not None:
        tally.flush()
        tokens = tally.at_least
    skipped = round((back - front) * tally.tokens / front) if back > front else 0
    return _build_document(source, pages, skipped), tokens


@contextlib.contextmanager
def _seekable(source: _Source) -> Iterator[BinaryIO]:
    """A regular file as it is (pypdf reads only the objects it needs); a stream spooled to memory,
    then to a temp file past SPOOL_BYTES."""
    if source.regular:
        yield source.stream
        return
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
        for data in source.chunks():
            spool.write(data)
        spool.seek(0)
        yield spool


def _finish(source: _Source, file: BinaryIO) -> None:
    """Hash the rest of a regular file (pypdf moved its position: hash it from its start)."""
    if not source.regular:
        return
    file.seek(0)
    source.size, source.digest = 0, hashlib.sha256()
    for _ in source.chunks():
        pass


def _open_pdf(name: str, file: BinaryIO) -> PdfReader:
    """Open the PDF; an encrypted one is opened only if the empty password works."""
    from pypdf import PdfReader  # imported here: ~0.1 s, and only PDFs need it
    from pypdf.errors import DependencyError

    try:
        reader = PdfReader(file)
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


def _build_document(source: _Source, pages: list[str | None], skipped_tokens: int) -> Document:
    """Join the pages read; a page skipped (None) has an empty span where the text jumps past it."""
    spans, parts, start = [], [], 0
    for page in pages:
        if page is None:
            spans.append((start, start))
            continue
        if parts:
            parts.append(PAGE_SEPARATOR)
            start += len(PAGE_SEPARATOR)
        spans.append((start, start + len(page)))
        parts.append(page)
        start += len(page)
    return Document(source.name, "".join(parts), source.digest.hexdigest(), source.size, tuple(spans), skipped_tokens)
