"""Rich rendering on stderr: progress of long steps and the stats table of an answer."""

import json
import sys
from contextlib import contextmanager
from statistics import mean

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from core.engine import Answer

stderr = Console(stderr=True)
MIB = 1 << 20


@contextmanager
def progress_reporter(quiet: bool):
    """Yields a core Progress callback drawing a bar per step on stderr, shown only while a step runs.

    The bars stop as soon as every step is complete, so a streamed answer on the same terminal
    is never interleaved with a live display.
    """
    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
    )
    tasks: dict[str, int] = {}

    def report(step: str, done: int, total: int) -> None:
        if quiet:
            return
        if step not in tasks:
            tasks[step] = bars.add_task(step, total=total or None)
            bars.start()
        bars.update(tasks[step], completed=done, total=total or None)
        if bars.finished:
            bars.stop()

    try:
        yield report
    finally:
        bars.stop()


def seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} s"


def stats_table(answer: Answer) -> Table:
    s = answer.stats
    table = Table(title=f"{answer.model} · {answer.method}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("model load", seconds(s.load_s)),
        ("read", seconds(s.read_s)),
        ("tokenize", seconds(s.tokenize_s)),
        ("cache load", seconds(s.cache_load_s)),
        ("prefill", seconds(s.prefill_s)),
        ("time to first token", seconds(s.ttft_s)),
        (
            "decode",
            "—" if s.decode_tokens_per_s is None else f"{s.decode_tokens_per_s:.1f} tok/s ({s.new_tokens} tokens)",
        ),
        ("context tokens", f"{s.context_tokens:,}" + (f" ({s.dropped_tokens:,} dropped)" if s.dropped_tokens else "")),
    ]
    if s.kept_tokens_per_layer:
        kept = s.kept_tokens_per_layer
        rows.append(("kept tokens / layer", f"min {min(kept):,} · mean {mean(kept):,.0f} · max {max(kept):,}"))
    shrink = next((i for i in range(1, len(s.layer_tokens)) if s.layer_tokens[i] < s.layer_tokens[i - 1]), None)
    if shrink is not None:
        rows.append(
            ("propagated", f"{s.layer_tokens[shrink]:,} of {s.layer_tokens[0]:,} tokens after layer {shrink - 1}")
        )
    rows.append(("KV cache", f"{s.kv_bytes_kept / MIB:.1f} MiB kept of {s.kv_bytes_full / MIB:.1f} MiB full"))
    for name, value in rows:
        table.add_row(name, value)
    return table


def print_json(answer: Answer) -> None:
    sys.stdout.write(json.dumps(answer.to_dict(), ensure_ascii=False) + "\n")
    sys.stdout.flush()
