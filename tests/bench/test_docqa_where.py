"""bench/tasks/docqa.jsonl: every row says where its answer is stated (`where`, as in docqa-fresh.jsonl: a PDF
page, a range of lines of a text), and one of its answers is stated there."""

from pathlib import Path

import pytest
from tasks.docqa import questions
from tasks.locations import ROOT, document, stated_at, whole_words

ROWS = questions()
MAX_LINES = 8  # a place a reader looks to check the answer, not a whole section


def test_every_row_has_a_well_formed_where():
    assert len(ROWS) == 201
    for row in ROWS:
        assert set(row) == {"document", "question", "answers", "where"}, row
        where = row["where"]
        if row["document"].endswith(".pdf"):
            assert set(where) == {"page"} and 1 <= where["page"] <= document(row["document"]).pages, row
        else:
            assert set(where) == {"lines"} and len(where["lines"]) == 2, row
            first, last = where["lines"]
            count = len((ROOT / row["document"]).read_text(encoding="utf-8").splitlines())
            assert 1 <= first <= last <= count and last - first < MAX_LINES, row


@pytest.mark.parametrize("row", ROWS, ids=lambda row: f"{Path(row['document']).name}:{row['answers'][0]}")
def test_one_of_the_answers_is_stated_where_the_row_says(row):
    part = stated_at(row)
    assert any(whole_words(answer, part) for answer in row["answers"]), f"{row['answers']} not at {row['where']}"
