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
    half: str = "tuning"  # HALVES: settings are chosen on the tuning half, claims made on the held-out one


HALVES = ("tuning", "held-out")


def half_of(index: int) -> str:
    """Items alternate between the halves by a fixed index, so each half spans every document, depth and length."""
    return HALVES[index % 2]


def text_document(name: str, text: str) -> Document:
    """A one-page Document of generated text, as core.documents would read it from a file."""
    data = text.encode("utf-8")
    return Document(name, text, hashlib.sha256(data).hexdigest(), len(data), ((0, len(text)),))
