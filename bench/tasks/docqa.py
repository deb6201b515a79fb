"""Document QA: short factual questions about long real texts shipped in the repository (docqa.jsonl)."""

import json
from dataclasses import replace
from itertools import zip_longest
from pathlib import Path

from common import ROOT

from core.documents import read_document
from tasks import HALVES, Item, half_of

DATA = Path(__file__).with_name("docqa.jsonl")
# Documents no setting was chosen on (bench/texts/fresh/): held out whole, so a claim made on them is split
# by document, not by question; every question of DATA's documents is then tuning data.
FRESH = Path(__file__).with_name("docqa-fresh.jsonl")


def questions(data: Path = DATA) -> list[dict]:
    """The data file's rows: {"document": path from the repository root, "question", "answers": [spans], "where"}.
    `where` is the place an answer is stated (tasks.locations.stated_at): {"lines": [first, last]}, 1-based and
    inclusive, of a text file, or {"page": N}, 1-based, of a PDF."""
    return [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]


def items(data: Path = DATA) -> list[Item]:
    """Every question, taking one per document in turn (shortest document first), so a --limit spans them.
    DATA's halves alternate within each document's list; FRESH's questions are all held out."""
    by_document: dict[str, list[dict]] = {}
    for row in questions(data):
        index = len(by_document.get(row["document"], []))
        row["half"] = HALVES[1] if data == FRESH else half_of(index)
        by_document.setdefault(row["document"], []).append(row)
    documents = {path: replace(read_document(str(ROOT / path)), name=path) for path in by_document}
    order = sorted(by_document, key=lambda path: len(documents[path].text))
    rows = [row for turn in zip_longest(*(by_document[path] for path in order)) for row in turn if row is not None]
    return [
        Item(
            "docqa",
            row["document"],
            documents[row["document"]],
            row["question"],
            tuple(row["answers"]),
            half=row["half"],
        )
        for row in rows
    ]
