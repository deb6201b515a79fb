"""Accuracy of every method and budget on passkey retrieval and document QA, query-aware and from saved caches.

python bench/accuracy.py [--tasks passkey docqa] [--methods fullkv fastkv snapkv streamingllm gemfilter]
    [--budgets 5% 10% 20% 40%] [--lengths 1024 2048 4096 7680]
    [--modes ask agnostic two-stage query-aware every-token] [--cache-dtypes float16 int8 int6 int4]
    [--half tuning|held-out] [--limit N] [--model M] [--tag NAME] [--no-write] [--from-raw | --resume]

Tasks (bench/tasks/, nothing is downloaded): `passkey`, a 5-6 digit key hidden at depths 0-100% of the
license texts at each prompt length, scored by exact digits; `docqa`, about 50 short factual questions on
the shipped license texts and examples/lighthouse.md (bench/tasks/docqa.jsonl), scored by normalised
substring match and token F1.

Modes: `ask` puts the question at the end of the prompt (query-aware, as `fastkv ask`); `agnostic`
builds a saved cache at the budget without the question, then appends it (`fastkv cache build` +
`cache query`); `two-stage` builds at min(100%, 3 x budget) and lets each question re-select down to
the budget (`--query-budget`); `query-aware` builds a cache paused at fastkv's TSP layer that each
question resumes (`--query-aware`); `every-token` builds a fullkv cache and lets each question select
the budget from it (`--method fullkv --query-budget`: SnapKV with the question's own tokens).
gemfilter re-prefills with new positions, so it has no saved cache. With `--cache-dtypes`, each saved
cache is also written and read back in each storage dtype (`cache build --cache-dtype`), one variant
per dtype; without it, the saved modes query the cache as built, in memory.
Fidelity compares every answer with fullkv's `ask` answer to the same question: the share of equal
greedy answers, and KL(fullkv || method) of the first answer token's distribution. It measures the
compression itself, also where the small model answers wrongly. A saved mode's answers are also
compared with `ask`'s at the same method and budget (every-token: fastkv's, what `fastkv ask` runs).
Every answer is saved after each document (docs/accuracy-*.json, beside the plot); for a run that was
stopped, the same options with `--from-raw` render the tables, plot and section from them, and with
`--resume` go on with the documents it left.
`--half` keeps one fixed half of the items (bench/tasks: settings are chosen on `tuning`, claims made
on `held-out`, as bench/sweep.py does).

Speed tricks, all exact (tests/test_bench_accuracy.py checks caches and logits bit for bit):
- answers are short: greedy decoding stops after --max-new-tokens (24);
- one recorded full prefill per prompt gives fullkv, snapkv and streamingllm at every budget and
  gemfilter's first pass (its re-prefill of the chosen tokens runs for real); one recorded fastkv
  prefill gives fastkv at every budget (bench/tasks/replay.py explains why);
- saved caches are built once per document and budget, and every question of it queries a copy.
Prefill seconds of a replayed method are the recorded prefill's plus that method's own selection.
"""

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from common import ROOT, Report, Table, cell, reduced_run, tag, write_atomic, write_section
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from tasks import HALVES, Item, docqa, passkey
from tasks.replay import question_recordings, record_build, replay, replay_build, shared_recordings
from tasks.scoring import Score, score
from torch import Tensor

from core.engine import Engine, SavedContext
from core.errors import FastKVError
from core.generation import Decoding, generate
from core.kvcache import KVCache
from core.methods import DEFAULT_METHOD, METHODS, Budget, Method, make_method
from core.methods.fullkv import FullKV
from core.options import BuildPlan
from core.prompt import encode_question
from core.store import STORAGE_DTYPES, load_cache, save_cache

TASKS = ("passkey", "docqa")
DEFAULT_METHODS = ["fullkv", "fastkv", "snapkv", "streamingllm", "gemfilter"]
DEFAULT_BUDGETS = ["5%", "10%", "20%", "40%"]
DEFAULT_LENGTHS = [1024, 2048, 4096, 7680]
MODES = ("ask", "agnostic", "two-stage", "query-aware", "every-token")
SAVED_TARGETS = {"points": 1.0, "same_as_ask": 90.0}  # #13: within 1 point of ask, ask's answer on ≥ 90% of items
MAX_NEW_TOKENS = 24
STORED_FACTOR = 3.0
TARGET_BUDGET = "20%"


@dataclass(frozen=True)
class Variant:
    """How one answer is produced: mode, method, final budget (None: fullkv) and, for a saved mode, the
    storage dtype its cache goes through (None: queried in memory as built)."""

    mode: str
    method: str
    budget: Budget | None = None
    dtype: str | None = None

    @property
    def budget_label(self) -> str:
        return "—" if self.budget is None else str(self.budget)

    @property
    def dtype_label(self) -> str:
        return "—" if self.dtype is None else self.dtype

    @property
    def asked(self) -> "Variant | None":
        """The ask variant a saved one is compared with: same method and budget (every-token: `ask`'s
        default method at the budget); None for an ask variant."""
        if self.mode == "ask":
            return None
        return Variant("ask", DEFAULT_METHOD if self.mode == "every-token" else self.method, self.budget)

    @property
    def build(self) -> "Variant":
        """The build this variant's cache comes from, whatever dtype it is stored in."""
        return replace(self, dtype=None)


REFERENCE = Variant("ask", "fullkv")  # every answer's fidelity is measured against it


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


@dataclass(frozen=True)
class Settings:
    variants: list[Variant]
    decoding: Decoding
    stored_factor: float


def stored_budget(budget: Budget, factor: float) -> Budget:
    """What a two-stage cache stores for a final `budget`: factor x budget, at most the whole context."""
    if budget.proportional:
        return Budget(min(1.0, budget.value * factor), proportional=True)
    return Budget(int(budget.value * factor), proportional=False)


def variant_methods(variant: Variant, factor: float) -> tuple[Method, Budget | None]:
    """The method to prefill or build with, and the budget a saved cache's query re-selects to."""
    if variant.budget is None:
        return FullKV(), None
    if variant.mode == "every-token":
        return FullKV(), variant.budget
    if variant.mode == "two-stage":
        return make_method(variant.method, budget=stored_budget(variant.budget, factor)), variant.budget
    return make_method(variant.method, budget=variant.budget), None


def plan(
    methods: list[str], budgets: list[Budget], modes: list[str], dtypes: list[str | None] = (None,)
) -> list[Variant]:
    """fullkv ask first (always: it is the reference), then every method, budget and mode asked for, each
    saved mode in every storage dtype. every-token builds fullkv's cache whatever --methods says."""
    variants = [REFERENCE]
    for mode in modes:
        usable = [m for m in methods if m != "fullkv" and not (mode != "ask" and METHODS[m].restarts)]
        usable = [m for m in usable if mode != "query-aware" or METHODS[m].propagates]  # it pauses at TSP
        usable = ["fullkv"] if mode == "every-token" else usable
        stored = [None] if mode == "ask" else dtypes
        variants += [Variant(mode, m, budget, dtype) for m in usable for budget in budgets for dtype in stored]
    return variants


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


def decode(engine: Engine, cache: KVCache, logits: Tensor, decoding: Decoding) -> str:
    """The greedy answer, as engine.ask/query would print it; decoding appends to `cache`."""
    tokens = generate(engine.runner, cache, logits, decoding.max_new_tokens, engine.stop_ids, decoding.sampling)
    return engine.loaded.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def question_ids(engine: Engine, question: str) -> list[int]:
    return encode_question(engine.loaded.tokenizer, engine.template, question)


def ask_ids(engine: Engine, item: Item, decoding: Decoding) -> Tensor:
    """The prompt engine.ask prefills: the document's context, then the question [L]."""
    question = question_ids(engine, item.question)
    context = engine.context([item.document], len(question) + decoding.max_new_tokens, None)
    return engine.tensor(context.ids + question)


def query(engine: Engine, saved: SavedContext, question: str, decoding: Decoding) -> tuple[str, Tensor]:
    """engine.query's steps, keeping the first token's logits: append the question to a fresh copy of
    the saved cache, then decode."""
    cache, logits, _ = engine.append_question(saved, question_ids(engine, question))
    return decode(engine, cache, logits, decoding), logits


def run_ask(
    engine: Engine, item: Item, settings: Settings, advance: Callable[[], None]
) -> tuple[list[Outcome], Reference]:
    """Every ask variant of one item, REFERENCE first, from at most two recorded prefills."""
    ids = ask_ids(engine, item, settings.decoding)
    question = len(question_ids(engine, item.question))  # the scoring window of a question-window method
    recording_for = question_recordings(engine.runner, ids, question)
    outcomes, ref = [], None
    for variant in (v for v in settings.variants if v.mode == "ask"):
        method = variant_methods(variant, settings.stored_factor)[0].for_question(question)
        prefill, seconds = replay(engine.runner, recording_for(method), method)
        text = decode(engine, prefill.cache.clone(), prefill.logits, settings.decoding)
        ref = ref or Reference(text, prefill.logits)
        outcomes.append(outcome(item, variant, text, prefill.logits, seconds, ref))
        advance()
    return outcomes, replace(ref, asked={o.variant: o.answer for o in outcomes})


def run_saved(
    engine: Engine, items: list[Item], refs: list[Reference], settings: Settings, advance: Callable[[], None]
) -> list[Outcome]:
    """Every saved-cache variant for the items of one document: one build per method, budget and mode (shared
    by its storage dtypes), one query per item."""
    reserved = max(len(question_ids(engine, item.question)) for item in items) + settings.decoding.max_new_tokens
    record = partial(record_build, engine, [items[0].document], reserved=reserved)
    recording_for = shared_recordings(record, recording_of=lambda built: built[1])
    paused = None  # one paused build serves every budget: it caches every token up to the TSP layer
    built: tuple[Variant, SavedContext] | None = None  # plan() puts a build's storage dtypes one after another
    outcomes = []
    for variant in (v for v in settings.variants if v.mode != "ask"):
        method, query_budget = variant_methods(variant, settings.stored_factor)
        if built is not None and built[0] == variant.build:
            saved = built[1]
        elif variant.mode == "query-aware":
            if paused is None:
                paused = engine.build([items[0].document], BuildPlan(method, query_aware=True), reserved=reserved)
            manifest = {**paused.manifest, "method": {"name": method.name, "parameters": method.parameters()}}
            saved = SavedContext(paused.cache, manifest, paused.stats)
        else:
            method = method.for_question(None)  # as engine.build resolves a question-blind build
            saved = replay_build(engine.runner, *recording_for(method), method, query_budget)
        built = variant.build, saved
        if variant.dtype is not None:
            saved = stored(engine, saved, variant.dtype)
        for item, ref in zip(items, refs, strict=True):
            text, logits = query(engine, saved, item.question, settings.decoding)
            outcomes.append(outcome(item, variant, text, logits, saved.stats.prefill_s, ref))
            advance()
    return outcomes


def stored(engine: Engine, saved: SavedContext, dtype: str) -> SavedContext:
    """`saved` as `cache query` would see it after `cache build --cache-dtype dtype`: written and read back."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.fkv"
        save_cache(path, saved.cache, saved.manifest, dtype, model=engine.runner)
        cache, manifest = load_cache(path, engine.loaded.device, engine.loaded.dtype, engine.runner)
    return SavedContext(cache, {**saved.manifest, **manifest}, saved.stats)


def groups(items: list[Item]) -> list[list[Item]]:
    """Items sharing a document, in order of first appearance."""
    by_group: dict[str, list[Item]] = {}
    for item in items:
        by_group.setdefault(item.group, []).append(item)
    return list(by_group.values())


def run(
    engine: Engine,
    items: list[Item],
    settings: Settings,
    on_group: Callable[[list[Outcome]], None] = lambda outcomes: None,
    earlier: list[Outcome] | None = None,
) -> list[Outcome]:
    """Every variant of every item, document by document, with a progress bar weighted by document size.
    `on_group` gets the outcomes so far after each document (a long run that is stopped keeps them);
    `earlier`: a stopped run's outcomes, whose documents are not asked again."""
    outcomes = list(earlier or [])
    done = {(o.item.task, o.item.group) for o in outcomes}
    left = [group for group in groups(items) if (group[0].task, group[0].group) not in done]
    columns = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn()]
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    total = sum(len(item.document.text) for group in left for item in group) * len(settings.variants)
    console = Console(stderr=True)
    console.print(f"{sum(map(len, left))} questions × {len(settings.variants)} method/budget/mode variants")
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("accuracy", total=total)
        for group in left:
            size = len(group[0].document.text)
            bar.update(task, description=f"{group[0].task}: {group[0].group}")
            advance = partial(bar.advance, task, size)
            refs = []
            for item in group:
                asked, ref = run_ask(engine, item, settings, advance)
                outcomes += asked
                refs.append(ref)
            outcomes += run_saved(engine, group, refs, settings, advance)
            on_group(outcomes)
    return outcomes


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


def results_table(engine: Engine, outcomes: list[Outcome], settings: Settings, minutes: float | None) -> Table:
    table = Table(
        title=f"Accuracy and fidelity per method, budget and mode ({engine.loaded.name}, {engine.loaded.dtype})",
        headers=[
            "task",
            "mode",
            "method",
            "budget",
            "storage",
            "n",
            "accuracy %",
            "F1 %",
            "same as ask %",
            "same as fullkv %",
            "KL",
            "prefill s",
        ],
        text_columns=5,
    )
    for task in tasks_of(outcomes):
        for variant in settings.variants:
            s = summarise(select(outcomes, task, variant))
            if s is not None:
                numbers = [cell(s.accuracy, 1), cell(s.f1, 1), cell(s.same_as_ask, 1), cell(s.same, 1),
                           f"{s.kl:.3g}", cell(s.prefill_s, 2)]  # fmt: skip
                labels = [task, variant.mode, variant.method, variant.budget_label, variant.dtype_label]
                table.rows.append([*labels, str(s.n), *numbers])
    table.caption = (
        "ask: the question ends the prompt (query-aware). agnostic: a saved cache built at the budget without the "
        f"question. two-stage: built at min(100%, {settings.stored_factor:g}× budget), each question re-selects down "
        "to the budget. query-aware: built paused at the TSP layer, each question resumes it as ask would. "
        "every-token: a fullkv cache, each question selects the budget from it (SnapKV with its own tokens). "
        "storage: the saved cache written and read back in that dtype (—: queried in memory as built). "
        "accuracy: passkey digits exact / docqa normalised answer span contained in the answer; F1: token F1 "
        "(docqa). same as ask: a saved mode's greedy answer identical to ask's at the same method and budget "
        f"(every-token: {DEFAULT_METHOD}'s). same as fullkv: greedy answer identical to fullkv's ask answer; KL: "
        "mean KL(fullkv ask ‖ "
        "method) of the first answer token (0 for snapkv and streamingllm in ask mode: they compress after an exact "
        "prefill, so only later tokens can differ). "
        f"Greedy, at most {settings.decoding.max_new_tokens} new tokens. prefill s: "
        "ask: context + question; saved modes: the document's build (once per document, shared by its questions; "
        "a query-aware query then runs the deeper layers on the tokens its question selects, bench/cache.py times it). "
        + (
            f"Whole run: {minutes:.0f} min."
            if minutes is not None
            else "Rendered from the per-item answers a run saved."
        )
    )
    return table


def passkey_table(outcomes: list[Outcome], settings: Settings) -> Table | None:
    """Passkey accuracy per prompt length, method and budget, in ask mode."""
    asked = [o for o in select(outcomes, "passkey") if o.variant.mode == "ask"]
    if not asked:
        return None
    budgets = list(dict.fromkeys(v.budget for v in settings.variants if v.budget is not None))
    methods = list(dict.fromkeys(v.method for v in settings.variants if v.mode == "ask"))
    table = Table(
        title="Passkey accuracy % by prompt length (ask mode)",
        headers=["tokens", "method", *map(str, budgets)],
        text_columns=2,
    )
    for length in sorted({o.item.length for o in asked}):
        for method in methods:
            per_budget = [None] * len(budgets) if method == "fullkv" else budgets
            values = [accuracy(asked, variant=Variant("ask", method, b), length=length) for b in per_budget]
            table.rows.append([str(length), method, *(cell(v, 0) for v in values)])
    table.caption = "fullkv keeps everything: its one accuracy is repeated under every budget. 5 depths per length."
    return table


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
    """#13's bar for a default `cache build` + `cache query`, per saved variant compared with `fastkv ask`
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
    #13: int8 changes no passkey answer (PASS/MISS); the rest is counted and reported (INFO)."""
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
    """The targets: a 'PASS|MISS|N/A target (measured)' line each; N/A where the run lacks what one needs.
    None for a run with no variant at TARGET_BUDGET: a focused run, where every line would be N/A."""
    budget, tasks = Budget.parse(TARGET_BUDGET), tasks_of(outcomes)
    if not any(o.variant.budget == budget for o in outcomes):
        return []
    lines = [passkey_check(outcomes, budget)] if "passkey" in tasks else []
    lines += [docqa_check(outcomes, budget)] if "docqa" in tasks else []
    return [*lines, fidelity_check(outcomes, budget), *saved_cache_checks(outcomes, budget)]


def fullkv_line(outcomes: list[Outcome]) -> str:
    """fullkv's own accuracy: the model's ceiling, which the compressed methods are measured against."""
    scores = ", ".join(f"{task} {fmt(accuracy(outcomes, task, REFERENCE))}%" for task in tasks_of(outcomes))
    return f"Full KV (no compression) scores {scores}: the model's own limit; read each method against it, not 100%."


def plot(outcomes: list[Outcome], settings: Settings, title: str, path: Path) -> None:
    """Accuracy against budget: one panel per task, a colour per method, a line style per mode."""
    tasks = tasks_of(outcomes)
    budgets = list(dict.fromkeys(v.budget for v in settings.variants if v.budget is not None))
    methods = list(dict.fromkeys(v.method for v in settings.variants if v.budget is not None))
    styles = {"ask": "-o", "query-aware": "-.D", "two-stage": "--s", "agnostic": ":^", "every-token": "-.x"}
    lines = list(dict.fromkeys((v.mode, v.dtype) for v in settings.variants))
    fig = Figure(figsize=(6 * len(tasks), 4.5))
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=True):
        ax.axhline(accuracy(outcomes, task, REFERENCE), color="black", linestyle="--", label="fullkv (ask)")
        for color, method in enumerate(methods):
            for mode, dtype in lines:
                values = [accuracy(outcomes, task, Variant(mode, method, b, dtype)) for b in budgets]
                label = f"{method} ({mode}{'' if dtype is None else ', ' + dtype})"
                if None not in values:
                    ax.plot(range(len(budgets)), values, styles[mode], color=f"C{color}", label=label)
        ax.set(title=task, xlabel="KV budget", ylabel="accuracy %", ylim=(-3, 103))
        ax.set_xticks(range(len(budgets)), [str(b) for b in budgets])
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1, 0.5))
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


TARGETS_HEADING = f"Targets at budget {TARGET_BUDGET}:"
SAVED_HEADING = "Saved caches against `ask` (#13), at each budget run:"


def section_body(
    tables: list[Table], outcomes: list[Outcome], verdicts: list[str], saved: list[str], plot_path: Path
) -> str:
    targets = [TARGETS_HEADING, "", *[f"- {line}" for line in verdicts], ""] if verdicts else []
    targets += [SAVED_HEADING, "", *[f"- {line}" for line in saved], ""] if saved else []
    plot_link = f"![Accuracy against KV budget per method and mode]({plot_path.name})"
    return "\n".join([*(t.markdown() for t in tables), fullkv_line(outcomes), "", *targets, plot_link, ""])


def task_items(name: str, engine: Engine, lengths: list[int]) -> list[Item]:
    if name == "passkey":
        return passkey.items(engine.loaded.tokenizer, engine.template, lengths)
    return docqa.items()


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS)
    parser.add_argument("--budgets", nargs="+", default=DEFAULT_BUDGETS, help="final KV budgets (10%% or 1024)")
    parser.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS, help="passkey prompt lengths")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--half", choices=HALVES, help="only this fixed half of the items (default: both)")
    parser.add_argument("--limit", type=int, help="at most this many questions per task")
    parser.add_argument(
        "--cache-dtypes",
        "--cache-dtype",
        nargs="+",
        choices=STORAGE_DTYPES,
        help="saved modes: write and re-load each cache in each of these storage dtypes (default: query it in memory)",
    )
    parser.add_argument("--stored-factor", type=float, default=STORED_FACTOR, help="two-stage: stored / final budget")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="answer length limit")
    parser.add_argument("--model", help="model to load (default: the embedded SmolLM2-135M)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--tag",
        type=tag,
        help="write a focused run to its own docs/ section and plot, named with NAME (a-z, 0-9, -), beside the full run's",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    stopped = parser.add_mutually_exclusive_group()
    stopped.add_argument(
        "--from-raw", action="store_true", help="run nothing: render the per-item answers a stopped run saved"
    )
    stopped.add_argument(
        "--resume", action="store_true", help="go on with a stopped run: ask only the documents it left"
    )
    return parser, parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Outcome]:
    parser, args = parse_args(argv)
    try:
        budgets = [Budget.parse(text) for text in args.budgets]
        decoding = Decoding(max_new_tokens=args.max_new_tokens)
    except FastKVError as error:
        parser.error(str(error))
    engine = Engine.load(args.model, args.device)
    if "passkey" in args.tasks and max(args.lengths) + args.max_new_tokens > engine.loaded.context_window:
        parser.error(
            f"--lengths go up to {max(args.lengths)}, and with {args.max_new_tokens} answer tokens past the "
            f"model's window of {engine.loaded.context_window}"
        )
    items = [
        item
        for name in args.tasks
        for item in [i for i in task_items(name, engine, args.lengths) if args.half in (None, i.half)][: args.limit]
    ]
    variants = plan(args.methods, budgets, args.modes, args.cache_dtypes or [None])
    settings = Settings(variants, decoding, args.stored_factor)
    report = Report.of(
        "accuracy" + (f"-{args.tag}" if args.tag else ""),
        "Accuracy per method, budget and mode" + (f" ({args.tag})" if args.tag else ""),
        engine.loaded.spec,
    )
    raw = report.plot.with_suffix(".json")  # every answer, rewritten after each document

    def save_raw(outcomes: list[Outcome]) -> None:
        if not args.no_write:
            write_atomic(raw, json.dumps([record(o) for o in outcomes], indent=1) + "\n")

    earlier = []
    if args.from_raw or args.resume:
        if not raw.is_file():
            parser.error(f"no saved answers to go on from: {raw.relative_to(ROOT)} does not exist")
        by_key = {(i.task, i.group, i.question): i for i in items}
        earlier = [from_record(r, by_key) for r in json.loads(raw.read_text(encoding="utf-8"))]
    if args.from_raw:
        outcomes, minutes = earlier, None
    else:
        start = time.perf_counter()
        with torch.inference_mode():
            outcomes = run(engine, items, settings, save_raw, earlier)
        minutes = None if earlier else (time.perf_counter() - start) / 60
    tables = [results_table(engine, outcomes, settings, minutes)]
    tables += [table for table in [passkey_table(outcomes, settings)] if table is not None]
    for table in tables:
        table.print()
    verdicts, saved = checks(outcomes), default_candidate_checks(outcomes) + storage_checks(outcomes)
    print(fullkv_line(outcomes), *([TARGETS_HEADING, *verdicts] if verdicts else []), sep="\n  ")
    if saved:
        print(SAVED_HEADING, *saved, sep="\n  ")
    if minutes is not None:
        print(f"whole run: {minutes:.1f} min")
    if not args.no_write:
        plot(outcomes, settings, f"Accuracy against KV budget, {engine.loaded.name}", report.plot)
        reduced = reduced_run(
            tasks=(args.tasks, list(TASKS)),
            methods=(args.methods, DEFAULT_METHODS),
            budgets=(args.budgets, DEFAULT_BUDGETS),
            lengths=(args.lengths, DEFAULT_LENGTHS),
            modes=(args.modes, list(MODES)),
            limit=(args.limit, None),
            stored_factor=(args.stored_factor, STORED_FACTOR),
            max_new_tokens=(args.max_new_tokens, MAX_NEW_TOKENS),
            cache_dtypes=(args.cache_dtypes, None),
            half=(args.half, None),
        )
        body = section_body(tables, outcomes, verdicts, saved, report.plot)
        path = write_section(report.section, report.heading, body, engine.loaded.device, reduced)
        print(f"wrote {path} and {report.plot}")
    return outcomes


if __name__ == "__main__":
    main()
