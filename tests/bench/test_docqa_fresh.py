"""bench/tasks/docqa-fresh.jsonl: the held-out document-QA set is sound. Every answer is a span of its document as
fastkv reads it, stated where the row says (a PDF page, a range of lines), and no document is one docqa.jsonl uses."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from tasks.locations import document, squash, stated_at, whole_words
from tasks.scoring import normalise

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "bench" / "tasks" / "docqa-fresh.jsonl"
USED = ROOT / "bench" / "tasks" / "docqa.jsonl"
TEXTS = ROOT / "bench" / "texts" / "fresh"
MAX_PDF_BYTES = 300 * 1024


def rows(path: Path = DATA) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


ROWS = rows()


def test_the_set_has_70_questions_over_9_documents_3_of_them_pdfs():
    assert len(ROWS) >= 70
    assert len({(row["document"], row["question"]) for row in ROWS}) == len(ROWS)
    per_document = Counter(row["document"] for row in ROWS)
    assert len(per_document) >= 9
    assert all(6 <= count <= 10 for count in per_document.values()), per_document
    assert sum(path.endswith(".pdf") for path in per_document) >= 3


def test_every_row_has_the_fields_of_docqa():
    for row in ROWS:
        assert set(row) == {"document", "question", "answers", "where"}, row
        assert row["question"].strip() and row["answers"], row
        assert all(isinstance(answer, str) and normalise(answer) for answer in row["answers"]), row
        pdf = row["document"].endswith(".pdf")
        assert set(row["where"]) == ({"page"} if pdf else {"lines"}), row


@pytest.mark.parametrize("row", ROWS, ids=lambda row: f"{Path(row['document']).name}:{row['answers'][0]}")
def test_every_answer_is_a_span_of_its_document_stated_where_the_row_says(row):
    assert (ROOT / row["document"]).is_file()
    text = squash(document(row["document"]).text)
    for answer in row["answers"]:  # a variant may be part of a word: "0.7.0" of "v0.7.0"
        assert squash(answer) in text, f"{answer!r} is not in {row['document']}"
    part = stated_at(row)
    assert whole_words(row["answers"][0], part), f"{row['answers'][0]!r} is not at {row['where']}"


def test_the_pdfs_are_read_with_their_pages_and_are_small():
    for path in sorted({row["document"] for row in ROWS if row["document"].endswith(".pdf")}):
        doc = document(path)
        assert doc.pages > 1 and all(end > start for start, end in doc.page_spans[:-1]), path
        assert (ROOT / path).stat().st_size < MAX_PDF_BYTES, path


def test_no_document_of_the_fresh_set_is_used_by_docqa():
    fresh = {row["document"] for row in ROWS}
    used = {row["document"] for row in rows(USED)}
    assert not fresh & used
    digest = lambda path: hashlib.sha256((ROOT / path).read_bytes()).hexdigest()  # noqa: E731
    assert not {digest(path) for path in fresh} & {digest(path) for path in used}  # nor a copy under a new name


def test_every_file_in_the_folder_is_in_the_set_and_its_readme():
    readme = (TEXTS / "README.md").read_text(encoding="utf-8")
    files = {path.name for path in TEXTS.iterdir() if path.name != "README.md"}
    assert files == {Path(row["document"]).name for row in ROWS}
    assert all(f"`{name}`" in readme for name in files), files
    assert all(row["document"].startswith("bench/texts/fresh/") for row in ROWS)
