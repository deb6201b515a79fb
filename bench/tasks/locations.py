"""Where a document question's answer is stated: the part of its document a row's `where` names (a PDF page, or
a range of lines of a text file), and whether an answer is stated there as whole words."""

import re
from functools import cache
from pathlib import Path

from core.documents import Document, read_document

ROOT = Path(__file__).resolve().parents[2]


def squash(text: str) -> str:
    """Line breaks and runs of spaces as one space: an answer may wrap across lines in the text."""
    return " ".join(text.split())


def whole_words(span: str, text: str) -> bool:
    """`span` occurs in `text` not as part of a longer word or number ("elm" not in "helm", "1.1" not in "1.17")."""
    return re.search(rf"(?<!\w){re.escape(squash(span))}(?!\w)", squash(text)) is not None


@cache
def document(path: str) -> Document:
    """The document at `path` (from the repository root) as fastkv reads it."""
    return read_document(str(ROOT / path))


def stated_at(row: dict) -> str:
    """The part of the document the row's `where` names: a PDF page, or lines [first, last] of a text file."""
    where = row["where"]
    if "page" in where:
        doc = document(row["document"])
        if not 1 <= where["page"] <= doc.pages:
            raise ValueError(f"{row['document']} has no page {where['page']}")
        start, end = doc.page_spans[where["page"] - 1]
        return doc.text[start:end]
    first, last = where["lines"]
    lines = (ROOT / row["document"]).read_text(encoding="utf-8").splitlines()
    if not 1 <= first <= last <= len(lines):
        raise ValueError(f"{row['document']} has no lines {first}-{last}")
    return "\n".join(lines[first - 1 : last])
