"""The accuracy benchmark's targets: one 'PASS|MISS|N/A target (measured)' line each, judged on a run's
outcomes (N/A where the run lacks what a target needs; INFO for what is only counted)."""

from dataclasses import replace

from answers.outcomes import Outcome, accuracy, select, summarise, tasks_of
from answers.variants import REFERENCE, Variant
from core.methods import DEFAULT_METHOD, Budget

TARGET_BUDGET = "20%"
SAVED_TARGETS = {"points": 1.0, "same_as_ask": 90.0}  # a default saved cache: within 1 point of ask, ask's answer ≥ 90%


def verdict(ok: bool | None, target: str, measured: str) -> str:
    return f"{'N/A' if ok is None else 'PASS' if ok else 'MISS'} {target} ({measured})"


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def passkey_check(outcomes: list[Outcome], budget: Budget) -> str:
    target = f"passkey: fastkv within 3 points of fullkv at {budget}, at the lengths where fullkv scores ≥ 80%"
    lengths = sorted({o.item.length for o in select(outcomes, "passkey")})
    full = {n: accuracy(outcomes, variant=REFERENCE, length=n) for n in lengths}
    judged = [n for n in lengths if (full[n] or 0) >= 80]
    fast = {n: accuracy(outcomes, variant=Variant("ask", "fastkv", budget), length=n) for n in judged}
    if not judged or None in fast.values():
        return verdict(None, target, f"fullkv by length: {', '.join(f'{n}: {fmt(full[n])}' for n in lengths)}")
    measured = ", ".join(f"{n}: fastkv {fmt(fast[n])} vs fullkv {fmt(full[n])}" for n in judged)
    return verdict(all(fast[n] >= full[n] - 3 for n in judged), target, measured)


def docqa_check(outcomes: list[Outcome], budget: Budget) -> str:
    target = f"docqa at {budget}: fastkv ≥ snapkv − 1 and > streamingllm and > gemfilter"
    acc = {
        m: accuracy(outcomes, "docqa", Variant("ask", m, budget))
        for m in ("fastkv", "snapkv", "streamingllm", "gemfilter")
    }
    measured = ", ".join(f"{m} {fmt(a)}" for m, a in acc.items())
    fast = acc.pop("fastkv")
    others = {m: a for m, a in acc.items() if a is not None}
    if fast is None or not others:
        return verdict(None, target, measured)
    ok = all(fast >= a - 1 if m == "snapkv" else fast > a for m, a in others.items())
    return verdict(ok, target, measured)


def fidelity_check(outcomes: list[Outcome], budget: Budget) -> str:
    target = f"fastkv at {budget} (ask) gives fullkv's greedy answer ≥ 70% of the time"
    s = summarise(select(outcomes, variant=Variant("ask", "fastkv", budget)))
    return verdict(None if s is None else s.same >= 70, target, "—" if s is None else f"{s.same:.1f}%, n={s.n}")


def dtypes_of(outcomes: list[Outcome]) -> list[str | None]:
    """The storage dtypes the saved modes ran in (None: in memory), at least [None]."""
    return list(dict.fromkeys(o.variant.dtype for o in outcomes if o.variant.mode != "ask")) or [None]


def saved_cache_checks(outcomes: list[Outcome], budget: Budget) -> list[str]:
    lines = []
    for mode in ("query-aware", "two-stage"):
        for dtype in dtypes_of(outcomes):
            stored = "" if dtype is None else f", {dtype} storage"
            for task in tasks_of(outcomes):
                target = f"{task}: fastkv {mode} saved cache{stored} within 3 points of ask at {budget}"
                asked = accuracy(outcomes, task, Variant("ask", "fastkv", budget))
                saved = accuracy(outcomes, task, Variant(mode, "fastkv", budget, dtype))
                ok = None if asked is None or saved is None else saved >= asked - 3
                lines.append(verdict(ok, target, f"{mode} {fmt(saved)} vs ask {fmt(asked)}"))
    return lines


def saved_variants(outcomes: list[Outcome]) -> list[Variant]:
    return list(dict.fromkeys(o.variant for o in outcomes if o.variant.mode != "ask"))


def default_candidate_checks(outcomes: list[Outcome]) -> list[str]:
    """The targets of a default `cache build` + `cache query`, per saved variant compared with `fastkv ask`
    at its budget: every task within 1 point of ask's accuracy, ask's answer on ≥ 90% of the items."""
    lines = []
    for variant in saved_variants(outcomes):
        if variant.asked.method != DEFAULT_METHOD or not select(outcomes, variant=variant.asked):
            continue
        points = SAVED_TARGETS["points"]
        scores = {
            task: (accuracy(outcomes, task, variant), accuracy(outcomes, task, variant.asked))
            for task in tasks_of(outcomes)
        }
        s = summarise(select(outcomes, variant=variant))
        ok = all(saved >= asked - points for saved, asked in scores.values() if saved is not None)
        ok = ok and s.same_as_ask is not None and s.same_as_ask >= SAVED_TARGETS["same_as_ask"]
        stored = "in memory" if variant.dtype is None else f"{variant.dtype} storage"
        target = (
            f"{variant.mode} {variant.method} {variant.budget_label}, {stored}, as the default cache build: every "
            f"task within {points:g} point of ask, ask's answer on ≥ {SAVED_TARGETS['same_as_ask']:g}% of items"
        )
        measured = [f"{task} {fmt(saved)} vs ask {fmt(asked)}" for task, (saved, asked) in scores.items()]
        lines.append(verdict(ok, target, ", ".join([*measured, f"same as ask {fmt(s.same_as_ask)}%, n={s.n}"])))
    return lines


def storage_checks(outcomes: list[Outcome]) -> list[str]:
    """Answers that each quantized storage changes against float16 storage of the same build, per task.
    int8 must change no passkey answer (PASS/MISS); the rest is counted and reported (INFO)."""
    answers: dict[Variant, dict[tuple, str]] = {}
    for o in outcomes:
        if o.variant.mode != "ask" and o.variant.dtype is not None:
            answers.setdefault(o.variant, {})[(o.item.task, o.item.group, o.item.question)] = o.answer
    lines = []
    for variant, quantized in answers.items():
        base = answers.get(replace(variant, dtype="float16"))
        if variant.dtype == "float16" or base is None:
            continue
        changed = {
            task: [base[key] != text for key, text in quantized.items() if key[0] == task]
            for task in ("passkey", "docqa")
        }
        counts = ", ".join(f"{task} answers changed {sum(c)} of {len(c)}" for task, c in changed.items() if c)
        what = f"{variant.dtype} vs float16 storage, {variant.mode} {variant.method} {variant.budget_label}: {counts}"
        judged = variant.dtype == "int8" and changed["passkey"]
        lines.append(f"{('MISS' if any(changed['passkey']) else 'PASS') if judged else 'INFO'} {what}")
    return lines


def checks(outcomes: list[Outcome]) -> list[str]:
    """The targets at TARGET_BUDGET, a verdict line each; none for a run with no variant at that budget
    (a focused run, where every line would be N/A)."""
    budget, tasks = Budget.parse(TARGET_BUDGET), tasks_of(outcomes)
    if not any(o.variant.budget == budget for o in outcomes):
        return []
    lines = [passkey_check(outcomes, budget)] if "passkey" in tasks else []
    lines += [docqa_check(outcomes, budget)] if "docqa" in tasks else []
    return [*lines, fidelity_check(outcomes, budget), *saved_cache_checks(outcomes, budget)]
