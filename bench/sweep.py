"""The compression policy's frontier: prefill speed-up over fullkv against passkey, docqa and "same answer
as fullkv", per setting, on one fixed half of the benchmark items.

python bench/sweep.py [--half tuning|held-out] [--policies NAME ...] [--tasks passkey docqa]
    [--lengths 2048 4096 8192] [--limit N] [--model M] [--tag NAME] [--no-write] [--from-raw | --resume]

The per-item results are saved after every item (docs/results/sweep-*.json); for a run that was stopped, the same
options with `--from-raw` render the tables, plot and section from them, and with `--resume` go on with
the items it left.

Every policy (POLICIES: budget as a share, a floor or both, TSP rate and layer, scoring window, pooling
kernels, head-adaptive budgets (adakv, and fastkv's cache selection), snapkv, and the defaults old and
new) answers every item of the half with the question ending the
prompt, as `fastkv ask` does. The halves are fixed (bench/tasks: items alternate by their index within a
document, and by depth and length for passkeys): settings are chosen on `tuning`, claims are made on
`held-out`.

A policy costs a selection and a decode, not a prefill, wherever that is exact (bench/tasks/replay.py):
one full prefill per item serves fullkv and snapkv at every budget, one fastkv prefill serves every
policy that sends the same tokens past its TSP layer. Speed-up: per item, the full prefill's seconds over
the seconds of the prefill the policy replays, the median over the items of about 8K and 16K tokens. It
is indicative only: the full prefill runs first for each item and pays that length's first allocations,
and the machine's load varies between the two; bench/speed.py measures a chosen policy's speed
(interleaved repeats after a warm-up), and only its numbers are claims.
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accuracy import MAX_NEW_TOKENS, TASKS, task_items
from answers.outcomes import kl_divergence
from common import ROOT, Report, Table, cell, link, reduced_run, tag, write_atomic, write_section
from matplotlib.figure import Figure
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from tasks import HALVES, Item
from tasks.replay import ask_ids, decoded, question_ids, question_recordings, replay
from tasks.scoring import score

from core.engine import Engine
from core.generation import Decoding
from core.kvcache import full_kv_bytes
from core.methods import DEFAULT_METHOD, Method, make_method

DEFAULT_LENGTHS = [2048, 4096, 8192]
BANDS = {"8K": (7000, 12000), "16K": (14000, 20000)}  # prompt tokens whose items give the speed-up "at 8K", "at 16K"
RECORDED_WINDOW = 64  # queries each recording keeps, or the question's tokens if more: every policy's window


@dataclass(frozen=True)
class Policy:
    """A named setting of one method; `tsp_depth` places fastkv's TSP layer as a share of the model's depth."""

    name: str
    method: str
    parameters: dict = field(default_factory=dict)
    tsp_depth: float | None = None

    def make(self, num_layers: int, question_tokens: int) -> Method:
        parameters = dict(self.parameters)
        if self.tsp_depth is not None:
            parameters["tsp_layer"] = round(num_layers * self.tsp_depth) - 1
        return make_method(self.method, **parameters).for_question(question_tokens)


Q = "question"  # the scoring window is the question's own tokens, the chat template's tail included
POLICIES = [
    Policy("fullkv", "fullkv"),
    Policy("default", DEFAULT_METHOD),  # whatever core's defaults are now
    Policy("old default (10%, window 8)", "fastkv", {"budget": "10%", "window": 8}),
    Policy("20%, window 8", "fastkv", {"budget": "20%", "window": 8}),
    Policy("10%", "fastkv", {"budget": "10%", "window": Q}),
    Policy("20%", "fastkv", {"budget": "20%", "window": Q}),
    Policy("30%", "fastkv", {"budget": "30%", "window": Q}),
    Policy("40%", "fastkv", {"budget": "40%", "window": Q}),
    Policy("20%,1024", "fastkv", {"budget": "20%,1024", "tsp_rate": "20%,1024", "window": Q}),
    Policy("20%,2048", "fastkv", {"budget": "20%,2048", "tsp_rate": "20%,2048", "window": Q}),
    Policy("30%,2048", "fastkv", {"budget": "30%,2048", "tsp_rate": "30%,2048", "window": Q}),
    Policy("20%, TSP kernel 7", "fastkv", {"budget": "20%", "window": Q, "tsp_kernel": 7}),
    Policy("20%, cache kernel 15", "fastkv", {"budget": "20%", "window": Q, "kernel": 15}),
    Policy("20%, TSP at 2/3 depth", "fastkv", {"budget": "20%", "window": Q}, tsp_depth=2 / 3),
    Policy("snapkv 20%", "snapkv", {"budget": "20%", "window": Q}),
    Policy("snapkv 40%", "snapkv", {"budget": "40%", "window": Q}),
    Policy("adakv 20%", "adakv", {"budget": "20%", "window": Q}),
    Policy("adakv 40%", "adakv", {"budget": "40%", "window": Q}),
    Policy("10%, head-adaptive", "fastkv", {"budget": "10%", "window": Q, "head_budget": "adaptive"}),
    Policy("default, head-adaptive", DEFAULT_METHOD, {"head_budget": "adaptive"}),
]
BY_NAME = {policy.name: policy for policy in POLICIES}


@dataclass
class Result:
    """One policy's answer to one item."""

    policy: str
    item: str  # group and question
    task: str
    tokens: int  # the prompt
    length: int | None  # passkey: the prompt length it was made for
    answer: str
    correct: bool
    same: bool  # the greedy answer equals fullkv's
    kl: float  # KL(fullkv || policy) of the first answer token
    speedup: float  # the full prefill's seconds over the policy's
    kv_share: float  # cached bytes over fullkv's


def item_name(item: Item) -> str:
    return f"{item.group}: {item.question}"


def run_item(engine: Engine, item: Item, policies: list[Policy], decoding: Decoding) -> list[Result]:
    """Every policy on one item, fullkv first (the reference), from as few recorded prefills as exact."""
    question = question_ids(engine, item.question)
    ids = ask_ids(engine, [item.document], question, decoding.max_new_tokens)
    recording_for = question_recordings(engine.runner, ids, len(question), RECORDED_WINDOW)
    full_kv = full_kv_bytes(engine.loaded.config, len(ids), engine.loaded.dtype)
    results, reference, full_s = [], None, None
    for policy in [BY_NAME["fullkv"], *(p for p in policies if p.name != "fullkv")]:
        method = policy.make(engine.runner.num_layers, len(question))
        prefill, seconds = replay(engine.runner, recording_for(method), method)
        answer = decoded(engine, prefill, decoding)
        reference = reference or (answer, prefill.logits)
        full_s = full_s or seconds
        results.append(
            Result(
                policy.name,
                item_name(item),
                item.task,
                len(ids),
                item.length,
                answer,
                score(item.task, answer, item.answers).correct,
                answer == reference[0],
                kl_divergence(reference[1], prefill.logits),
                full_s / seconds,
                prefill.cache.nbytes / full_kv,
            )
        )
    return results if "fullkv" in {p.name for p in policies} else results[1:]


def run(
    engine: Engine,
    items: list[Item],
    policies: list[Policy],
    decoding: Decoding,
    on_item: Callable[[list[Result]], None] = lambda results: None,
    earlier: list[Result] | None = None,
) -> list[Result]:
    """Every policy on every item; `on_item` gets the results so far after each item (a long run that is
    stopped keeps them). `earlier`: a stopped run's results, whose items are not asked again."""
    columns = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn()]
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    results = list(earlier or [])
    answered = {r.item for r in results}
    items = [item for item in items if item_name(item) not in answered]
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("sweep", total=sum(len(item.document.text) for item in items))
        for item in items:
            bar.update(task, description=f"{item.task}: {item.group}")
            results += run_item(engine, item, policies, decoding)
            on_item(results)
            bar.advance(task, len(item.document.text))
    return results


@dataclass(frozen=True)
class Point:
    """One policy's place on the frontier."""

    policy: str
    passkey: float | None
    docqa: float | None
    same: float
    kl: float
    speedup: float | None  # median over the items of about 8K tokens
    speedup_16k: float | None  # the same at 16K, where the run has such items
    kv_share: float


def percent(flags: list[bool]) -> float | None:
    return 100 * sum(flags) / len(flags) if flags else None


def points(results: list[Result], policies: list[Policy]) -> list[Point]:
    made = []
    for policy in policies:
        mine = [r for r in results if r.policy == policy.name]
        if not mine:
            continue
        bands = {band: [r.speedup for r in mine if low <= r.tokens < high] for band, (low, high) in BANDS.items()}
        made.append(
            Point(
                policy.name,
                percent([r.correct for r in mine if r.task == "passkey"]),
                percent([r.correct for r in mine if r.task == "docqa"]),
                percent([r.same for r in mine]),
                statistics.mean(r.kl for r in mine),
                *(statistics.median(bands[band]) if bands[band] else None for band in BANDS),
                statistics.mean(r.kv_share for r in mine),
            )
        )
    return made


def on_frontier(point: Point, others: list[Point], metric: str) -> bool:
    """No other policy is at least as fast and at least as good on `metric`, and better on one of them."""
    value = getattr(point, metric)
    if value is None or point.speedup is None:
        return False
    for other in others:
        theirs = getattr(other, metric)
        if other is point or theirs is None or other.speedup is None:
            continue
        if other.speedup >= point.speedup and theirs >= value and (other.speedup > point.speedup or theirs > value):
            return False
    return True


def frontier_table(made: list[Point], answered: int, planned: int, half: str, minutes: float | None) -> Table:
    """`answered` of the `planned` items (fewer: a stopped run, rendered from its per-item results)."""
    count = f"{answered} items" if answered == planned else f"{answered} of its {planned} items: a stopped run"
    table = Table(
        title=f"Policy frontier on the {half} half ({count})",
        headers=[
            "policy",
            "passkey %",
            "docqa %",
            "same as fullkv %",
            "KL",
            "speed-up ~8K",
            "speed-up ~16K",
            "KV % of full",
        ],
        text_columns=1,
    )
    for p in made:
        marks = "".join(mark for metric, mark in (("same", "*"), ("docqa", "†")) if on_frontier(p, made, metric))
        table.rows.append(
            [
                p.policy + (f" {marks}" if marks else ""),
                cell(p.passkey, 1),
                cell(p.docqa, 1),
                cell(p.same, 1),
                f"{p.kl:.3g}",
                cell(p.speedup, 2, "×"),
                cell(p.speedup_16k, 2, "×"),
                cell(100 * p.kv_share, 1),
            ]
        )
    table.caption = (
        "Every policy asked with the question ending the prompt. A share with a floor (20%,2048) keeps the share "
        "of the context or the floor, whichever is more, for the cache and for what TSP propagates; 'window 8' "
        "scores with the prompt's last 8 tokens, every other fastkv/snapkv row with the question's own tokens. "
        "same as fullkv: the greedy answer equals fullkv's; KL: KL(fullkv ‖ policy) of the first answer token. "
        "Speed-up (indicative, not a measurement: bench/speed.py is): full prefill seconds over the policy's, "
        "timed once each per item, the full one first, median over the items of "
        f"{BANDS['8K'][0]:,}-{BANDS['8K'][1]:,} and {BANDS['16K'][0]:,}-{BANDS['16K'][1]:,} tokens. "
        "* on the speed/same frontier, † on the speed/docqa frontier. "
        + (f"Whole run: {minutes:.0f} min." if minutes is not None else "Rendered from the per-item results.")
    )
    return table


def passkey_table(results: list[Result], policies: list[Policy]) -> Table | None:
    """Passkeys found per prompt length: a policy must find them where fullkv does, at every length."""
    passkeys = [r for r in results if r.task == "passkey"]
    if not passkeys:
        return None
    lengths = sorted({r.length for r in passkeys})
    table = Table(title="Passkeys found per prompt length", headers=["policy", *map(str, lengths)], text_columns=1)
    for policy in policies:
        found = [[r.correct for r in passkeys if r.policy == policy.name and r.length == n] for n in lengths]
        if any(found):
            table.rows.append([policy.name, *(f"{sum(f)}/{len(f)}" if f else "—" for f in found)])
    return table


def plot(made: list[Point], title: str, path: Path) -> None:
    """Speed-up against each quality measure; the frontier joined, every policy labelled."""
    metrics = [("same", "same answer as fullkv %"), ("docqa", "docqa accuracy %"), ("passkey", "passkey accuracy %")]
    metrics = [(m, label) for m, label in metrics if any(getattr(p, m) is not None for p in made)]
    fig = Figure(figsize=(6 * len(metrics), 5))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, (metric, label) in zip(axes, metrics, strict=True):
        shown = [p for p in made if p.speedup is not None and getattr(p, metric) is not None]
        front = sorted((p for p in shown if on_frontier(p, made, metric)), key=lambda p: p.speedup)
        ax.plot([p.speedup for p in front], [getattr(p, metric) for p in front], "-", color="C1", label="frontier")
        for p in shown:
            style = {"default": ("C3", "*", 14), "fullkv": ("black", "s", 8)}.get(p.policy, ("C0", "o", 6))
            if p.policy.startswith("old default"):
                style = ("C2", "X", 10)
            ax.plot(p.speedup, getattr(p, metric), style[1], color=style[0], markersize=style[2])
            ax.annotate(
                p.policy, (p.speedup, getattr(p, metric)), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        ax.set(xlabel="prefill speed-up over fullkv at ~8K tokens", ylabel=label, title=label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--half", choices=HALVES, default="tuning")
    parser.add_argument("--policies", nargs="+", choices=list(BY_NAME), default=list(BY_NAME), metavar="NAME")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS, help="passkey prompt lengths")
    parser.add_argument("--limit", type=int, help="at most this many items per task")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--model", help="model to load (default: the embedded SmolLM2-135M)")
    parser.add_argument("--device", help="cpu or cuda")
    parser.add_argument("--tag", type=tag, help="name a focused run's section and plot")
    parser.add_argument("--no-write", action="store_true", help="print only; write nothing under docs/")
    stopped = parser.add_mutually_exclusive_group()
    stopped.add_argument(
        "--from-raw", action="store_true", help="run nothing: render the per-item results a stopped run saved"
    )
    stopped.add_argument("--resume", action="store_true", help="go on with a stopped run: ask only the items it left")
    return parser, parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Result]:
    parser, args = parse_args(argv)
    engine = Engine.load(args.model, args.device)
    decoding = Decoding(max_new_tokens=args.max_new_tokens)
    items = [
        item
        for name in args.tasks
        for item in [i for i in task_items(name, engine, args.lengths) if i.half == args.half][: args.limit]
    ]
    policies = [BY_NAME[name] for name in args.policies]
    name = f"sweep-{args.half}" + (f"-{args.tag}" if args.tag else "")
    report = Report.of(
        name, f"Policy sweep, {args.half} half" + (f" ({args.tag})" if args.tag else ""), engine.loaded.spec
    )
    raw = report.plot.with_suffix(".json")  # every result, rewritten after each item

    def save_raw(results: list[Result]) -> None:
        if not args.no_write:
            write_atomic(raw, json.dumps([r.__dict__ for r in results], indent=1) + "\n")

    saved = []
    if args.from_raw or args.resume:
        if not raw.is_file():
            parser.error(f"no saved results to go on from: {raw.relative_to(ROOT)} does not exist")
        saved = [Result(**r) for r in json.loads(raw.read_text(encoding="utf-8"))]
    if args.from_raw:  # a stopped run: its results so far, as it saved them after each item
        results, minutes = saved, None
    else:
        start = time.perf_counter()
        with torch.inference_mode():
            results = run(engine, items, policies, decoding, save_raw, saved)
        minutes = None if saved else (time.perf_counter() - start) / 60
    made = points(results, policies)
    answered = len({r.item for r in results})
    tables = [frontier_table(made, answered, len(items), args.half, minutes), passkey_table(results, policies)]
    tables = [table for table in tables if table is not None]
    for table in tables:
        table.print()
    if not args.no_write:
        plot(made, f"Frontier on the {args.half} half, {engine.loaded.name}", report.plot)
        reduced = reduced_run(
            tasks=(args.tasks, list(TASKS)),
            lengths=(args.lengths, DEFAULT_LENGTHS),
            limit=(args.limit, None),
            policies=(args.policies, list(BY_NAME)),
            max_new_tokens=(args.max_new_tokens, MAX_NEW_TOKENS),
        )
        body = "\n".join(
            [
                *(table.markdown() for table in tables),
                f"Per-item answers: [{raw.name}]({link(raw)}).",
                "",
                f"![Frontier]({link(report.plot)})",
                "",
            ]
        )
        path = write_section(report.section, report.heading, body, engine.loaded.device, reduced)
        print(f"wrote {path}, {report.plot} and {raw.relative_to(ROOT)}")
    return results


if __name__ == "__main__":
    main()
