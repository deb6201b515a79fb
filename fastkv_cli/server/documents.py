"""The documents a request sends or names, read on the model thread as core reads files and stdin."""

import base64
import binascii
import dataclasses
import io
import time
from collections.abc import Callable
from pathlib import Path

from core.documents import Document, read_document
from fastkv_cli.server.jobs import Job, RequestError
from fastkv_cli.server.schemas import DocumentIn


def upload_bytes(ref: DocumentIn) -> bytes:
    if (ref.content is None) == (ref.content_base64 is None):
        raise RequestError(400, "a document needs one of path, content or content_base64")
    if ref.content is not None:
        return ref.content.encode("utf-8", errors="surrogatepass")
    try:
        return base64.b64decode(ref.content_base64, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{ref.name or '<stdin>'}: content_base64 is not valid base64") from None


def uploaded_document(name: str, data: bytes) -> Document:
    """A document sent in the request (stdin, message content) read as core reads stdin: text or PDF."""
    document = read_document("-", stdin=io.BytesIO(data))
    return document if name == document.name else dataclasses.replace(document, name=name)


def named_document(path: Path, name: str, on_page) -> Document:
    """A file on the server, named as the client typed it: the name is part of the prompt and the answer."""
    document = read_document(str(path), on_page=on_page)
    return dataclasses.replace(document, name=name)


def read_all(readers: list[Callable], job: Job) -> tuple[list, float]:
    start = time.perf_counter()
    docs = [read(lambda done, total: job.progress("reading PDF pages", done, total)) for read in readers]
    return docs, time.perf_counter() - start
