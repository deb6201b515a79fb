"""The saved-cache frontier: each kind of cache `cache build` writes, at each budget and storage, against the
answers it keeps on document QA, asked as `cache query` asks them.

python bench/frontier.py [--set tuning|held-out] [--budgets 20% 30% 50% 60% 70%] [--head-budgets uniform global]
    [--storages int6] [--tsp-rate 50%] [--query-aware]
    [--limit N] [--documents N] [--model M] [--tag T] [--no-write] [--resume | --from-raw]

Sets: `tuning` is the tuning half of bench/tasks/docqa.jsonl (documents settings were chosen on before);
`held-out` every question of bench/tasks/docqa-fresh.jsonl, documents no setting has seen (split by document).

Kinds, each saved in its storage and read back as `cache query` reads it:
- fullkv: every token, float16 (the reference every answer is compared with) and int4;
- kvzip: reconstruction-scored (core/methods/kvzip.py), uniform and global budgets, int6 (--storages), each budget replayed
  exactly from one prefill that ran the probes through every layer and recorded their scores (bench/tasks/replay.py);
- kvzip + TSP: the same scores also choose the --tsp-rate tokens the deeper layers run on, replayed from one
  such prefill for every budget up to the rate;
- question-blind: fastkv at its default budget selected by the context's last tokens (`--question-blind`), int6;
- query-aware (with --query-aware): `cache build`'s previous default, paused at fastkv's TSP layer, coded.

Per variant: the file as a share of the float16 fullkv file, the build's prefill seconds, right answers, fullkv's
right answers kept (and lost per 25 questions), and the same answer as fullkv. On the tuning set it prints the
verdict of the default's rule, fixed before any run: among the variants whose answers equal fullkv's on at least
85% of the questions and lose at most one of fullkv's right answers per 25 questions, the smallest file (query
speed is bench/cache.py's to show). Answers are saved after each document (docs/results/, beside the plot):
`--resume` asks only the documents and variants a stopped run left, `--from-raw` renders them.
"""

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from answers.run import stored
from common import Report, Table, link, reduced_run, tag, write_atomic, write_section
from matplotlib.figure import Figure
from rich.console import Console
from tasks import Item, docqa
from tasks.replay import as_built, question_ids, record_build, replay_build
from tasks.scoring import contains_answer

from core.engine import Engine
from core.generation import Decoding
from core.methods import Budget, make_method
from core.methods.kvzip import HEAD_BUDGETS
from core.options import BuildPlan
from core.saved import SavedContext, fullkv_file_bytes

SETS = ("tuning", "held-out")
DECODING = Decoding(max_new_tokens=24)  # the answers are short spans
SAME_AS_FULLKV = 0.85  # the default's rule: the same answer as fullkv on at least this share of the questions
LOST_PER_25 = 1.0  # and at most this many of fullkv's right answers lost per 25 questions
BUDGETS = ["20%", "30%", "50%", "60%", "70%"]
HEAD_BUDGET_KINDS = ["uniform", "global"]


@dataclass(frozen=True)
class Variant:
    kind: str  # fullkv, kvzip, kvzip + TSP, question-blind, query-aware
    budget: str | None  # None: every token
    head_budget: str | None
    storage: str

    @property
    def label(self) -> str:
        parts = [self.kind] + [p for p in (self.budget, self.head_budget) if p] + [self.storage]
        return " · ".join(parts)


REFERENCE = Variant("fullkv", None, None, "float16")


def variants(
    budgets: list[str], head_budgets: list[str], storages: list[str], tsp_rate: str, query_aware: bool
) -> list[Variant]:
    found = [REFERENCE, Variant("fullkv", None, None, "int4")]
    found += [Variant("kvzip", b, h, s) for h in head_budgets for b in budgets for s in storages]
    rate = 0 if tsp_rate == "none" else Budget.parse(tsp_rate).tokens(10**6)
    within = [b for b in budgets if Budget.parse(b).tokens(10**6) <= rate]
    found += [Variant(f"kvzip + TSP {tsp_rate}", b, h, s) for h in head_budgets for b in within for s in storages]
    found.append(Variant("question-blind", "30%,2048", None, "int6"))
    if query_aware:
        found.append(Variant("query-aware", "30%,2048", None, "coded"))
    return found


class Builds:
    """Each variant's saved context for one document: kvzip's budgets replayed from one recording per propagation,
    the others built as `cache build` builds them."""

    def __init__(self, engine: Engine, item: Item, reserved: int, tsp_rate: str):
        self.engine, self.documents, self.reserved, self.tsp_rate = engine, [item.document], reserved, tsp_rate
        self.recordings: dict[str, tuple] = {}

    def recording(self, tsp: bool):
        key = "tsp" if tsp else "plain"
        if key not in self.recordings:  # global: the probes run through every layer, every score is kept
            inner = make_method("kvzip", budget=self.tsp_rate if tsp else "100%", head_budget="global",
                                tsp_rate=self.tsp_rate if tsp else None)  # fmt: skip
            inner = BuildPlan(inner).method  # its window resolved, as each replayed build's is
            self.recordings[key] = record_build(self.engine, self.documents, inner, self.reserved)
        return self.recordings[key]

    def saved(self, variant: Variant) -> tuple[SavedContext, float]:
        """The variant's saved context, and the seconds of the prefill that built it (a replay: the recording's)."""
        if variant.kind == "fullkv":
            saved, recording = self.recording(tsp=False)
            return as_built(saved, make_method("fullkv"), None), recording.seconds
        if variant.kind.startswith("kvzip"):
            tsp = variant.kind != "kvzip"
            saved, recording = self.recording(tsp)
            parameters = {"tsp_rate": self.tsp_rate} if tsp else {}
            method = make_method("kvzip", budget=variant.budget, head_budget=variant.head_budget, **parameters)
            method = BuildPlan(method).method
            return replay_build(self.engine.runner, saved, recording, method, None), recording.seconds
        plan = BuildPlan.of(make_method("fastkv"), query_aware=variant.kind == "query-aware", storage=variant.storage)
        saved = self.engine.build(self.documents, plan, reserved=self.reserved)
        return saved, saved.stats.prefill_s


def run_document(engine: Engine, items: list[Item], chosen: list[Variant], tsp_rate: str, console: Console) -> list:
    """Every variant's answers to one document's questions, fullkv's first."""
    reserved = max(len(question_ids(engine, item.question)) for item in items) + DECODING.max_new_tokens
    builds = Builds(engine, items[0], reserved, tsp_rate)
    records, reference = [], {}
    for variant in chosen:
        saved, seconds = builds.saved(variant)
        saved, size = stored(engine, saved, variant.storage)
        share = size / fullkv_file_bytes(saved.manifest.model, saved.manifest.context_tokens)
        for item in items:
            answer = engine.query(saved, item.question, decoding=DECODING).text
            reference.setdefault(item.question, answer)
            records.append({
                "variant": asdict(variant), "document": item.group, "question": item.question,
                "answer": answer, "right": contains_answer(answer, item.answers),
                "same_as_fullkv": answer == reference[item.question], "file_share": share, "build_s": seconds,
                "context_tokens": saved.manifest.context_tokens,
            })  # fmt: skip
        console.print(f"  {variant.label}: {share:.1%} of fullkv's file, prefill {seconds:.1f} s")
    return records


@dataclass(frozen=True)
class Row:
    variant: Variant
    questions: int
    right: int
    kept: int  # fullkv's right answers this variant also gets right
    same: int
    file_share: float  # mean over documents
    build_s: float  # summed over documents
    fullkv_right: int  # fullkv's right answers among the questions this variant was asked

    @property
    def lost_per_25(self) -> float:
        return 25 * (self.fullkv_right - self.kept) / self.questions

    @property
    def meets_answers(self) -> bool:
        return self.same >= SAME_AS_FULLKV * self.questions and self.lost_per_25 <= LOST_PER_25


def rows(records: list[dict]) -> list[Row]:
    by_variant: dict[Variant, list[dict]] = {}
    for record in records:
        by_variant.setdefault(Variant(**record["variant"]), []).append(record)
    fullkv_right = {(r["document"], r["question"]) for r in by_variant.get(REFERENCE, []) if r["right"]}
    found = []
    for variant, answers in by_variant.items():
        shares = {r["document"]: r["file_share"] for r in answers}
        builds = {r["document"]: r["build_s"] for r in answers}
        asked = [(r["document"], r["question"]) in fullkv_right for r in answers]  # fullkv's right, of these
        found.append(Row(
            variant, len(answers), sum(r["right"] for r in answers),
            sum(r["right"] for r, right in zip(answers, asked, strict=True) if right),
            sum(r["same_as_fullkv"] for r in answers), sum(shares.values()) / len(shares), sum(builds.values()),
            sum(asked),
        ))  # fmt: skip
    return found


def table(found: list[Row]) -> Table:
    columns = ["cache", "file", "build prefill", "right", "fullkv's right kept", "lost / 25", "same as fullkv"]
    body = [
        [
            row.variant.label, f"{row.file_share:.1%}", f"{row.build_s:.0f} s", f"{row.right}/{row.questions}",
            f"{row.kept}/{row.fullkv_right}", f"{row.lost_per_25:.1f}", f"{row.same / row.questions:.0%}",
        ]
        for row in found
    ]  # fmt: skip
    return Table("Saved caches: file and answers", columns, body)


def verdict(found: list[Row]) -> str:
    """The rule, over the variants asked every question fullkv was (a resumed run may have asked fewer)."""
    asked = max(row.questions for row in found)
    found = [row for row in found if row.questions == asked]
    passing = [row for row in found if row.meets_answers and row.variant != REFERENCE]
    if not passing:
        closest = max(found, key=lambda row: (row.variant != REFERENCE, row.same))
        return f"no variant keeps the answers (closest: {closest.variant.label}, {closest.same}/{closest.questions})"
    best = min(passing, key=lambda row: row.file_share)
    return f"the rule picks {best.variant.label} ({best.file_share:.1%} of the fullkv file)"


def plot(found: list[Row], path: Path, title: str) -> None:
    """One line per kind, head budget and storage through its budgets, each point labelled with its budget."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    series: dict[str, list[Row]] = {}
    for row in found:
        variant = row.variant
        name = " · ".join(p for p in (variant.kind, variant.head_budget, variant.storage) if p)
        series.setdefault(name, []).append(row)
    for name, rows in series.items():
        rows = sorted(rows, key=lambda row: row.file_share)
        x = [100 * row.file_share for row in rows]
        y = [100 * row.same / row.questions for row in rows]
        axes.plot(x, y, marker="o", markersize=4, linewidth=1, label=name)
        for row, xy in zip(rows, zip(x, y, strict=True), strict=True):
            if row.variant.budget and len(rows) > 1:
                axes.annotate(row.variant.budget, xy, fontsize=6, xytext=(3, 3), textcoords="offset points")
    axes.axhline(100 * SAME_AS_FULLKV, color="grey", linestyle="--", linewidth=0.8)
    axes.set_xlabel("file, % of the float16 fullkv file")
    axes.set_ylabel("same answer as fullkv, % of questions")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=150)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=SETS, default="tuning")
    parser.add_argument("--budgets", nargs="+", default=BUDGETS)
    parser.add_argument("--head-budgets", nargs="+", choices=HEAD_BUDGETS, default=HEAD_BUDGET_KINDS)
    parser.add_argument("--storages", nargs="+", default=["int6"], help="kvzip's storages")
    parser.add_argument("--tsp-rate", default="50%", help="what kvzip + TSP propagates ('none': no TSP variants)")
    parser.add_argument("--query-aware", action="store_true")
    parser.add_argument("--limit", type=int, help="at most this many questions")
    parser.add_argument("--documents", type=int, help="only the questions of this many documents, shortest first")
    parser.add_argument("--model")
    parser.add_argument("--tag", type=tag)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--from-raw", action="store_true")
    args = parser.parse_args()
    items = docqa.items() if args.set == "tuning" else docqa.items(docqa.FRESH)
    items = [item for item in items if item.half == ("tuning" if args.set == "tuning" else "held-out")]
    shortest = list(dict.fromkeys(item.group for item in items))[: args.documents]
    items = [item for item in items if item.group in shortest][: args.limit]
    name = f"frontier-{args.set}" + (f"-{args.tag}" if args.tag else "")
    report = Report.of(name, f"Saved-cache frontier, {args.set} set", args.model)
    answers_file = report.plot.with_suffix(".answers.json")
    records = json.loads(answers_file.read_text()) if (args.resume or args.from_raw) and answers_file.exists() else []
    console = Console(stderr=True)
    engine = None
    if not args.from_raw:
        engine = Engine.load(args.model, None, None)
        chosen = variants(args.budgets, args.head_budgets, args.storages, args.tsp_rate, args.query_aware)
        done = {(r["document"], Variant(**r["variant"])) for r in records}
        by_document: dict[str, list[Item]] = {}
        for item in items:
            by_document.setdefault(item.group, []).append(item)
        for document, group in by_document.items():
            left = [variant for variant in chosen if (document, variant) not in done]
            if not left:
                continue
            left = left if REFERENCE in left else [REFERENCE, *left]  # each answer is compared with fullkv's
            console.print(f"{document}: {len(group)} questions × {len(left)} caches")
            fresh = run_document(engine, group, left, args.tsp_rate, console)
            records += [r for r in fresh if (document, Variant(**r["variant"])) not in done]
            if not args.no_write:
                write_atomic(answers_file, json.dumps(records, indent=1))
    found = rows(records)
    result = table(found)
    result.print()
    console.print(verdict(found))
    if args.no_write:
        return
    plot(found, report.plot, report.heading)
    rule = f"{verdict(found)}." if args.set == "tuning" else "Held-out: reported, nothing chosen on it."
    body = "\n".join([result.markdown(), "", rule, "", f"![frontier]({link(report.plot)})"])
    device = engine.loaded.device if engine else torch.device("cpu")
    reduced = reduced_run(
        budgets=(args.budgets, BUDGETS), head_budgets=(args.head_budgets, HEAD_BUDGET_KINDS),
        limit=(args.limit, None), documents=(args.documents, None),
    )  # fmt: skip
    write_section(report.section, report.heading, body, device, reduced, raw=[asdict(r) for r in found])


if __name__ == "__main__":
    main()
