"""bench/frontier.py's arithmetic: fullkv's right answers kept, the same answer as fullkv, and the default's rule
(answers first, then the smallest file) over synthetic answer records."""

from dataclasses import asdict

from frontier import REFERENCE, Variant, rows, verdict
from tasks import docqa

SMALL = Variant("kvzip", "20%", "uniform", "int6")
LARGE = Variant("kvzip", "50%", "global", "int6")


def records(variant: Variant, right: list[bool], same: list[bool], share: float, documents=("a", "b")) -> list[dict]:
    return [
        {"variant": asdict(variant), "document": documents[i % len(documents)], "question": f"q{i}",
         "answer": "", "right": r, "same_as_fullkv": s, "file_share": share, "build_s": 1.0, "context_tokens": 100}
        for i, (r, s) in enumerate(zip(right, same, strict=True))
    ]  # fmt: skip


def test_rows_count_fullkvs_right_answers_kept_and_lost_per_25_questions():
    reference = records(REFERENCE, [True] * 20 + [False] * 5, [True] * 25, 1.0)
    small = records(SMALL, [True] * 18 + [False] * 2 + [True] * 5, [True] * 20 + [False] * 5, 0.1)

    found = {row.variant: row for row in rows(reference + small)}

    row = found[SMALL]
    assert (row.questions, row.right, row.kept, row.fullkv_right, row.same) == (25, 23, 18, 20, 20)
    assert row.lost_per_25 == 2.0 and not row.meets_answers  # two of fullkv's right answers lost in 25
    assert found[REFERENCE].meets_answers


def test_the_rule_takes_the_smallest_file_among_those_that_keep_the_answers():
    reference = records(REFERENCE, [True] * 25, [True] * 25, 1.0)
    small = records(SMALL, [True] * 23 + [False] * 2, [True] * 23 + [False] * 2, 0.1)  # loses 2 per 25
    large = records(LARGE, [True] * 24 + [False], [True] * 22 + [False] * 3, 0.27)  # 88% the same, 1 lost

    assert "kvzip · 50% · global · int6" in verdict(rows(reference + small + large))
    assert "no variant keeps the answers" in verdict(rows(reference + small))


def test_the_rule_ignores_a_variant_asked_fewer_questions():
    reference = records(REFERENCE, [True] * 25, [True] * 25, 1.0)
    partial = records(SMALL, [True] * 5, [True] * 5, 0.1)

    assert "no variant keeps the answers" in verdict(rows(reference + partial))


def test_the_fresh_documents_are_held_out_whole_and_apart_from_the_tuning_documents():
    fresh, tuning = docqa.items(docqa.FRESH), docqa.items()

    assert {item.half for item in fresh} == {"held-out"}
    assert not {item.group for item in fresh} & {item.group for item in tuning}
    assert len(fresh) >= 60 and len({item.group for item in fresh}) >= 8
