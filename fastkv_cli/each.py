"""Corpus runs for the CLI (`ask --each`, `cache build --each`, `cache ask`): here (core/corpus.py) or on Ray
(core/cluster.py), rendered one document at a time: JSON lines or streamed answers on stdout, progress and a
summary on stderr."""

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from core.cluster import RayOptions, run_ray
from core.corpus import Item, Outcome, run_local
from core.errors import InputError
from fastkv_cli.options import ModelSpec, RayChoice
from fastkv_cli.render import print_json, stderr, stream_to_stdout


@dataclass(frozen=True)
class Corpus:
    """How to run the items: the model (loaded here, or by each Ray worker) and Ray's settings, if any."""

    spec: ModelSpec
    ray: RayChoice | None = None  # None: here

    def ray_options(self) -> RayOptions:
        return RayOptions(self.ray.address, self.ray.workers, self.ray.gpus_per_worker)


@dataclass
class Tally:
    """The run as it goes: for the progress line and the closing summary."""

    total: int
    start: float = field(default_factory=time.perf_counter)
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def done(self) -> int:
        return len(self.outcomes)

    def eta(self) -> str:
        if not self.done:
            return "—"
        left = (time.perf_counter() - self.start) / self.done * (self.total - self.done)
        return f"{int(left // 60)}:{int(left % 60):02d} left"


class Renderer:
    """Prints each outcome as it arrives, and a summary at the end."""

    def __init__(self, total: int, json: bool, quiet: bool, noun: str, streams: bool):
        self.tally, self.json, self.quiet, self.noun, self.streams = Tally(total), json, quiet, noun, streams
        self.bar = None
        if json and not quiet and stderr.is_interactive:  # nothing streams on the terminal: a live bar fits
            self.bar = Progress(
                TextColumn(noun), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=stderr,
                transient=True, redirect_stdout=False, redirect_stderr=False,
            )  # fmt: skip
            self.task = self.bar.add_task(noun, total=total)
            self.bar.start()

    def header(self, name: str) -> None:
        """The item's name on stdout before its answer (`==> name <==`, as `head` does), its place on stderr."""
        if self.json:
            return
        if not self.quiet:
            stderr.print(f"[dim][{self.tally.done + 1}/{self.tally.total} · {self.tally.eta()}][/dim]", highlight=False)
        stream_to_stdout(f"==> {name} <==\n")

    def on_start(self, item: Item) -> None:
        if self.streams:
            self.header(item.name)

    def on_outcome(self, outcome: Outcome, records: list[dict], text_streamed: bool) -> None:
        self.tally.outcomes.append(outcome)
        if not self.streams:
            self.header(outcome.name)
        for record in records:
            if self.json:
                print_json(record)
            elif "answer" in record and not text_streamed:
                stream_to_stdout(record["answer"])
            if not self.json and "answer" in record and not record["answer"].endswith("\n"):
                stream_to_stdout("\n")
            elif not self.json and "output" in record and "error" not in record:
                state = "up to date" if record.get("skipped") else f"{record['file_bytes'] / (1 << 20):.1f} MiB"
                stream_to_stdout(f"{record['output']} ({state})\n")
        if outcome.failed:
            stderr.print(f"[red]error:[/red] {escape(outcome.error)}", highlight=False, soft_wrap=True)
        if self.bar is not None:
            self.bar.update(self.task, completed=self.tally.done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()

    def summary(self) -> None:
        if self.quiet:
            return
        outcomes, total_s = self.tally.outcomes, time.perf_counter() - self.tally.start
        failed = [o for o in outcomes if o.failed]
        skipped = [o for o in outcomes if o.skipped]
        ttfts = [r["stats"]["ttft_s"] for o in outcomes for r in o.records if r.get("stats", {}).get("ttft_s")]
        table = Table(title=f"{len(outcomes)} {self.noun}", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column(justify="right")
        done = len(outcomes) - len(failed) - len(skipped)
        table.add_row("answered" if self.noun != "caches to build" else "built", str(done))
        if skipped:
            table.add_row("up to date (skipped)", str(len(skipped)))
        table.add_row("failed", str(len(failed)))
        table.add_row("total time", f"{total_s:.2f} s")
        if outcomes:
            table.add_row(f"per {self.noun.split()[-1].rstrip('s')}", f"{mean(o.seconds for o in outcomes):.2f} s")
        if ttfts:
            table.add_row("mean time to first token", f"{mean(ttfts):.2f} s")
        stderr.print(table)


def run(corpus: Corpus, task, items: list[Item], engine_loader, renderer: Renderer, records_of) -> int:
    """Run the items here (with the engine `engine_loader()` loads) or on Ray; -> the exit status."""
    try:
        if corpus.ray is None:
            engine = engine_loader()
            streamed = renderer.streams

            def on_outcome(outcome: Outcome) -> None:
                renderer.on_outcome(outcome, records_of(outcome), streamed)

            on_text = (lambda text: None) if renderer.json else stream_to_stdout
            run_local(engine, task, items, on_outcome, renderer.on_start, on_text if streamed else (lambda t: None))
        else:
            renderer.streams = False
            spec = (corpus.spec.model, corpus.spec.device, corpus.spec.dtype)
            on_outcome = lambda outcome: renderer.on_outcome(outcome, records_of(outcome), False)  # noqa: E731
            run_ray(corpus.ray_options(), spec, task, items, on_outcome, read_bytes=items_are_documents(task))
    finally:
        renderer.close()
    renderer.summary()
    return 1 if any(o.failed for o in renderer.tally.outcomes) else 0


def items_are_documents(task) -> bool:
    from core.corpus import QueryTask

    return not isinstance(task, QueryTask)


def document_items(paths: list[str], targets: list[Path] | None = None) -> list[Item]:
    if paths.count("-") > 1:
        raise InputError("-: stdin can be read only once; give '-' a single time")
    return [
        Item(i, path, target=None if targets is None else str(targets[i]))  # names as typed: part of the prompt
        for i, path in enumerate(paths)
    ]


def ask_records(question: str):
    def records(outcome: Outcome) -> list[dict]:
        if outcome.failed:
            return [{"question": question, "documents": [{"name": outcome.name}], "error": outcome.error}]
        return outcome.records

    return records


def build_records(outcome: Outcome) -> list[dict]:
    if outcome.failed:
        return [{"document": outcome.name, "error": outcome.error}]
    return outcome.records


def query_records(questions: tuple[str, ...]):
    def records(outcome: Outcome) -> list[dict]:
        if outcome.failed:
            return [{"cache": outcome.name, "question": q, "error": outcome.error} for q in questions]
        return outcome.records

    return records


def output_directory(path: Path) -> Path:
    """`-o DIR` of `cache build --each`: made if missing; refused before any work if it cannot hold files."""
    from core.storage import check_writable

    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: not a directory; with --each, -o takes the directory the caches go to")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{path}: cannot create the directory ({error.strerror or error})") from None
    check_writable(path)
    return path


def absolute(paths: list[Path]) -> list[Path]:
    return [Path(os.path.abspath(p)) for p in paths]
