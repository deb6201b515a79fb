"""Accuracy-benchmark tasks: questions with gold answers about documents generated or shipped in the repository."""

import hashlib
from dataclasses import dataclass

from core.documents import Document


@dataclass(frozen=True)
class Item:
    """One question about one document; items of the same `group` share the document (and a saved cache)."""

    task: str  # "passkey" or "docqa": also how the answer is scored
    group: str
    document: Document
    question: str
    answers: tuple[str, ...]  # acceptable answers (passkey: the key)
    length: int | None = None  # passkey: the prompt length it was made for, in tokens


def text_document(name: str, text: str) -> Document:
    """A one-page Document of generated text, as core.documents would read it from a file."""
    data = text.encode("utf-8")
    return Document(name, text, hashlib.sha256(data).hexdigest(), len(data), ((0, len(text)),))
