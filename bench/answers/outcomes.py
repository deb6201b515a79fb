"""One answer of the accuracy benchmark (an outcome: its score and its fidelity to fullkv's), as the raw answers
file keeps it, and what a set of outcomes adds up to."""

from collections.abc import Iterable
from dataclasses import dataclass, field

from tasks import Item
from tasks.scoring import Score, score
from torch import Tensor

from answers.variants import Variant
from core.methods import Budget


@dataclass
class Outcome:
    item: Item
    variant: Variant
    answer: str
    score: Score
    same: bool  # greedy answer equal to fullkv's ask answer
    kl: float  # KL(fullkv ask || this) of the first answer token's distribution
    prefill_s: float  # ask: context + question; saved modes: the document's build
    same_as_ask: bool | None = None  # a saved mode: equal to its `asked` variant's answer (None: not run)


@dataclass(frozen=True)
class Reference:
    """fullkv's ask answer to one item: its text and first-token logits [vocab]; and every ask variant's answer."""

    text: str
    logits: Tensor
    asked: dict = field(default_factory=dict)  # Variant -> answer text


def kl_divergence(reference: Tensor, logits: Tensor) -> float:
    """KL(softmax(reference) || softmax(logits)) in float64, logits [vocab]."""
    p, q = reference.double().log_softmax(-1), logits.double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum())


def outcome(item: Item, variant: Variant, text: str, logits: Tensor, seconds: float, ref: Reference) -> Outcome:
    asked = ref.asked.get(variant.asked)
    return Outcome(
        item,
        variant,
        text,
        score(item.task, text, item.answers),
        text == ref.text,
        kl_divergence(ref.logits, logits),
        seconds,
        None if asked is None else text == asked,
    )


def record(o: Outcome) -> dict:
    """One outcome as the raw file keeps it: the item by its task, group and question, not its document."""
    variant = {"mode": o.variant.mode, "method": o.variant.method, "cache_dtype": o.variant.dtype}
    budget = None if o.variant.budget is None else str(o.variant.budget)
    return {"task": o.item.task, "group": o.item.group, "question": o.item.question, **variant, "budget": budget,
            "answer": o.answer, "correct": o.score.correct, "f1": o.score.f1, "same": o.same, "kl": o.kl,
            "prefill_s": o.prefill_s, "same_as_ask": o.same_as_ask}  # fmt: skip


def from_record(r: dict, items: dict[tuple, Item]) -> Outcome:
    """record()'s inverse, given this run's items by (task, group, question)."""
    budget = None if r["budget"] is None else Budget.parse(r["budget"])
    variant = Variant(r["mode"], r["method"], budget, r["cache_dtype"])
    item = items[r["task"], r["group"], r["question"]]
    scored = Score(r["correct"], r["f1"])
    return Outcome(item, variant, r["answer"], scored, r["same"], r["kl"], r["prefill_s"], r["same_as_ask"])


@dataclass(frozen=True)
class Summary:
    n: int
    accuracy: float  # % correct
    f1: float | None  # mean token F1, %; None for passkey
    same: float  # % of answers equal to fullkv's ask answer
    kl: float  # mean KL(fullkv ask || method) of the first answer token
    prefill_s: float  # mean
    same_as_ask: float | None = None  # a saved mode: % of answers equal to its ask variant's


def select(
    outcomes: list[Outcome], task: str | None = None, variant: Variant | None = None, length: int | None = None
) -> list[Outcome]:
    return [
        o
        for o in outcomes
        if (task is None or o.item.task == task)
        and (variant is None or o.variant == variant)
        and (length is None or o.item.length == length)
    ]


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def summarise(outcomes: list[Outcome]) -> Summary | None:
    if not outcomes:
        return None
    f1 = [o.score.f1 for o in outcomes if o.score.f1 is not None]
    same_as_ask = [o.same_as_ask for o in outcomes if o.same_as_ask is not None]
    return Summary(
        len(outcomes),
        100 * mean(o.score.correct for o in outcomes),
        100 * mean(f1) if f1 else None,
        100 * mean(o.same for o in outcomes),
        mean(o.kl for o in outcomes),
        mean(o.prefill_s for o in outcomes),
        100 * mean(same_as_ask) if same_as_ask else None,
    )


def accuracy(
    outcomes: list[Outcome], task: str | None = None, variant: Variant | None = None, length: int | None = None
) -> float | None:
    summary = summarise(select(outcomes, task, variant, length))
    return None if summary is None else summary.accuracy


def tasks_of(outcomes: list[Outcome]) -> list[str]:
    return list(dict.fromkeys(o.item.task for o in outcomes))
