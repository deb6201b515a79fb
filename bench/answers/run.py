"""Running the accuracy benchmark's variants over its items, document by document: every ask variant from
recorded prefills, every saved variant from one build per document, each answer next to fullkv's."""

import tempfile
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from tasks import Item
from tasks.replay import (
    as_built,
    ask_ids,
    decoded,
    question_ids,
    question_recordings,
    record_build,
    replay,
    replay_build,
    shared_recordings,
)

from answers.outcomes import Outcome, Reference, outcome
from answers.variants import Settings, Variant, variant_methods
from core.engine import Engine
from core.options import BuildPlan
from core.saved import SavedContext
from core.storage import save_cache


def run_ask(
    engine: Engine, item: Item, settings: Settings, advance: Callable[[], None]
) -> tuple[list[Outcome], Reference]:
    """Every ask variant of one item, REFERENCE first, from at most two recorded prefills."""
    question = question_ids(engine, item.question)
    ids = ask_ids(engine, [item.document], question, settings.decoding.max_new_tokens)
    recording_for = question_recordings(engine.runner, ids, len(question))
    outcomes, ref = [], None
    for variant in (v for v in settings.variants if v.mode == "ask"):
        method = variant_methods(variant, settings.stored_factor)[0].for_question(len(question))
        prefill, seconds = replay(engine.runner, recording_for(method), method)
        text = decoded(engine, prefill, settings.decoding)
        ref = ref or Reference(text, prefill.logits)
        outcomes.append(outcome(item, variant, text, prefill.logits, seconds, ref))
        advance()
    return outcomes, replace(ref, asked={o.variant: o.answer for o in outcomes})


def run_saved(
    engine: Engine, items: list[Item], refs: list[Reference], settings: Settings, advance: Callable[[], None]
) -> list[Outcome]:
    """Every saved-cache variant for the items of one document: one build per method, budget and mode (shared
    by its storage dtypes), one engine.query per item."""
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
            saved = as_built(paused, method, None)
        else:
            method = BuildPlan(method).method  # as a question-blind build resolves it
            saved = replay_build(engine.runner, *recording_for(method), method, query_budget)
        built = variant.build, saved
        if variant.dtype is not None:
            saved = stored(engine, saved, variant.dtype)[0]
        for item, ref in zip(items, refs, strict=True):
            answer = engine.query(saved, item.question, decoding=settings.decoding)
            outcomes.append(outcome(item, variant, answer.text, answer.logits, saved.stats.prefill_s, ref))
            advance()
    return outcomes


def stored(engine: Engine, saved: SavedContext, dtype: str) -> tuple[SavedContext, int]:
    """`saved` as `cache query` loads it after `cache build --cache-dtype dtype`, with the build's stats, and the
    file's bytes."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.fkv"
        save_cache(path, saved.cache, saved.manifest, dtype, model=engine.runner)
        return replace(engine.load_saved(path), stats=saved.stats), path.stat().st_size


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
