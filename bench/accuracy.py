"""Accuracy of every method and budget on passkey retrieval and document QA, query-aware and from saved caches.

python bench/accuracy.py [--tasks passkey docqa] [--methods fullkv fastkv snapkv streamingllm gemfilter]
    [--budgets 5% 10% 20% 40%] [--lengths 1024 2048 4096 7680]
    [--modes ask question-blind two-stage query-aware every-token] [--cache-dtypes float16 int8 int6 int4]
    [--half tuning|held-out] [--limit N] [--model M] [--tag NAME] [--no-write] [--from-raw | --resume]

Tasks (bench/tasks/, nothing is downloaded): `passkey`, a 5-6 digit key hidden at depths 0-100% of the
license texts at each prompt length, scored by exact digits; `docqa`, about 50 short factual questions on
the shipped license texts and examples/lighthouse.md (bench/tasks/docqa.jsonl), scored by normalised
substring match and token F1.

Modes: `ask` puts the question at the end of the prompt (query-aware, as `fastkv ask`); `question-blind`
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
Every answer is saved after each document (docs/results/accuracy-*.json, beside the plot); for a run that was
stopped, the same options with `--from-raw` render the tables, plot and section from them, and with
`--resume` go on with the documents it left.
`--half` keeps one fixed half of the items (bench/tasks: settings are chosen on `tuning`, claims made
on `held-out`, as bench/sweep.py does).

Speed tricks, all exact (tests/bench/test_bench_accuracy.py checks caches and logits bit for bit):
- answers are short: greedy decoding stops after --max-new-tokens (24);
- one recorded full prefill per prompt gives fullkv, snapkv and streamingllm at every budget and
  gemfilter's first pass (its re-prefill of the chosen tokens runs for real); one recorded fastkv
  prefill gives fastkv at every budget (bench/tasks/replay.py explains why);
- saved caches are built once per document and budget, and every question of it queries a copy.
Prefill seconds of a replayed method are the recorded prefill's plus that method's own selection.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from answers.checks import checks, default_candidate_checks, storage_checks
from answers.outcomes import Outcome, from_record, record
from answers.report import SAVED_HEADING, TARGETS_HEADING, fullkv_line, passkey_table, plot, results_table, section_body
from answers.run import run
from answers.variants import MODES, STORED_FACTOR, Settings, plan
from common import ROOT, Report, reduced_run, tag, write_atomic, write_section
from tasks import HALVES, Item, docqa, passkey

from core.engine import Engine
from core.errors import FastKVError
from core.generation import Decoding
from core.methods import METHODS, Budget
from core.storage import STORAGE_DTYPES

TASKS = ("passkey", "docqa")
DEFAULT_METHODS = ["fullkv", "fastkv", "snapkv", "streamingllm", "gemfilter"]
DEFAULT_BUDGETS = ["5%", "10%", "20%", "40%"]
DEFAULT_LENGTHS = [1024, 2048, 4096, 7680]
MAX_NEW_TOKENS = 24


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


def chosen_items(engine: Engine, args: argparse.Namespace) -> list[Item]:
    """Each task's items in the half asked for, at most --limit of them."""
    return [
        item
        for name in args.tasks
        for item in [i for i in task_items(name, engine, args.lengths) if args.half in (None, i.half)][: args.limit]
    ]


def saved_outcomes(raw: Path, items: list[Item]) -> list[Outcome]:
    """The outcomes a run saved in `raw`, joined with this run's items."""
    by_key = {(i.task, i.group, i.question): i for i in items}
    return [from_record(r, by_key) for r in json.loads(raw.read_text(encoding="utf-8"))]


def reduced(args: argparse.Namespace) -> str | None:
    """The note the section carries on a run with other than the full run's options (None: the full run)."""
    return reduced_run(
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
    items = chosen_items(engine, args)
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
        earlier = saved_outcomes(raw, items)
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
        body = section_body(tables, outcomes, verdicts, saved, report.plot)
        path = write_section(report.section, report.heading, body, engine.loaded.device, reduced(args))
        print(f"wrote {path} and {report.plot}")
    return outcomes


if __name__ == "__main__":
    main()
