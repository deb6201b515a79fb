"""Answer scoring: SQuAD-style normalisation, substring match at word boundaries, token F1, passkey digits."""

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclass(frozen=True)
class Score:
    correct: bool
    f1: float | None  # None where token overlap means nothing (a passkey is right or wrong)


def normalise(text: str) -> str:
    """Lowercase, drop punctuation (2,410 -> 2410) and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return " ".join(ARTICLES.sub(" ", text).split())


def contains_answer(answer: str, gold: list[str] | tuple[str, ...]) -> bool:
    """The normalised answer contains a normalised gold span as whole words ("15" is not in "150")."""
    padded = f" {normalise(answer)} "
    return any(f" {normalise(span)} " in padded for span in gold)


def token_f1(answer: str, gold: list[str] | tuple[str, ...]) -> float:
    """Best token-overlap F1 of the normalised answer against any gold span."""
    return max(span_f1(normalise(answer).split(), normalise(span).split()) for span in gold)


def span_f1(predicted: list[str], expected: list[str]) -> float:
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def passkey_found(answer: str, key: str) -> bool:
    """The key is one of the answer's digit runs, exactly (thousands separators ignored)."""
    return key in re.findall(r"\d+", re.sub(r"(?<=\d)[,.](?=\d{3})", "", answer))


def score(task: str, answer: str, gold: tuple[str, ...]) -> Score:
    if task == "passkey":
        return Score(passkey_found(answer, gold[0]), None)
    return Score(contains_answer(answer, gold), token_f1(answer, gold))
