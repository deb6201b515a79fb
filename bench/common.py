"""Shared benchmark helpers: real-text prompts, interleaved timing, peak memory, tables, docs/benchmarks.md and
the raw files (plots, per-item answers) under docs/results/."""

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.table import Table as RichTable
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "benchmarks.md"
RAW = ROOT / "docs" / "results"  # every plot and per-item answers file, linked from RESULTS
TEXTS = ROOT / "bench" / "texts"
FIRST_TEXT = "gpl-3.0.txt"  # the longest text leads, so most prompts are one coherent document
MIB = 1 << 20


def real_text() -> str:
    """The shipped license texts, GPL-3.0 first, then the others by name, joined by blank lines."""
    paths = sorted(TEXTS.glob("*.txt"), key=lambda path: (path.name != FIRST_TEXT, path.name))
    return "\n\n".join(path.read_text(encoding="utf-8") for path in paths)


def prompt_ids(tokenizer, n: int, device: torch.device) -> Tensor:
    """Exactly n token ids [n] of real text; the texts repeat when a longer window asks for more."""
    ids = tokenizer(real_text(), add_special_tokens=False)["input_ids"]
    ids = ids * (n // len(ids) + 1)
    return torch.tensor(ids[:n], dtype=torch.long, device=device)


@torch.inference_mode()
def hf_logits(model, ids: Tensor) -> Tensor:
    """The HF model's own forward on ids [L] -> next-token logits [vocab], computing only the last position."""
    return model(ids[None], logits_to_keep=1).logits[0, -1].float()


def device_sync(device: torch.device) -> Callable[[], None]:
    """What waits for queued work on `device` before a clock is read (a no-op on CPU)."""
    return torch.cuda.synchronize if device.type == "cuda" else lambda: None


def interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    sync: Callable[[], None] = lambda: None,
    keep: dict[str, object] | None = None,
    before: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Seconds of each call, running the fns in turn A B C A B C ... for `repeats` rounds.

    Interleaving spreads machine noise (other processes, clocks) over every fn alike, so ratios of
    medians stay meaningful on a busy machine. `keep`, if given, receives each fn's last result;
    otherwise a result is dropped before the next fn runs. `before` runs, untimed, ahead of every call.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            before()
            sync()
            start = time.perf_counter()
            result = fn()
            sync()
            times[name].append(time.perf_counter() - start)
            if keep is not None:
                keep[name] = result
            del result
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def proc_status_kib(field_name: str) -> int:
    match = re.search(rf"^{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise OSError(f"/proc/self/status has no {field_name}")
    return int(match[1])


def reset_peak_rss() -> int | None:
    """Return freed heap to the OS and restart VmHWM at the current RSS (Linux): that RSS in bytes, else None."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed blocks; reused, they would hide a peak
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets this process's peak RSS (VmHWM)
        return proc_status_kib("VmRSS") * 1024
    except OSError:
        return None


class PeakMemory:
    """Extra memory one call needs above what was resident before it: process RSS on CPU, allocations on CUDA.

    Call `reset()` before the call (untimed) and `extra_mib()` right after it; None where unmeasurable.
    Measuring the increase, not the absolute peak, keeps results that other calls still hold out of it.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.base: int | None = None

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = reset_peak_rss()

    def extra_mib(self) -> float | None:
        if self.base is None:
            return None
        peak = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else proc_status_kib("VmHWM") * 1024
        return (peak - self.base) / MIB

    def resident_mib(self) -> float | None:
        """Memory held now (RSS or CUDA allocations), e.g. by the loaded model before any run."""
        gc.collect()
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated() / MIB
        base = reset_peak_rss()
        return None if base is None else base / MIB


def cpu_model() -> str:
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        match = None
    return match[1].strip() if match else platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    """One line: CPU, cores, torch threads, library versions and the device that ran the model."""
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return (
        f"{cpu_model()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads); "
        f"torch {torch.__version__}, transformers {transformers.__version__}; device {device.type} ({card})"
    )


def command_line() -> str:
    """How this script was started, as one would retype it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    script_text = str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else sys.argv[0]
    return " ".join(shlex.quote(part) for part in ["python", script_text, *sys.argv[1:]])


def reduced_run(**settings: tuple[object, object]) -> str | None:
    """A note naming every setting that differs from its full-run value, e.g. lengths=(given, full); None if none."""

    def text(value: object) -> str:
        return " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)

    changed = [
        f"{key} {text(given)} (full run: {text(full)})" for key, (given, full) in settings.items() if given != full
    ]
    return "; ".join(changed) or None


def cell(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


@dataclass
class Table:
    """One result table, printed to the terminal with rich and written to the results file as markdown."""

    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    caption: str = ""
    text_columns: int = 1  # leading columns of words (left-aligned); the rest are numbers

    def print(self) -> None:
        table = RichTable(title=self.title, caption=self.caption)
        for i, header in enumerate(self.headers):
            table.add_column(header, justify="left" if i < self.text_columns else "right")
        for row in self.rows:
            table.add_row(*row)
        Console(width=shutil.get_terminal_size((160, 24)).columns).print(table)

    def markdown(self) -> str:
        align = ["---" if i < self.text_columns else "---:" for i in range(len(self.headers))]
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.headers) + " |", "| " + " | ".join(align) + " |"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines + ["", self.caption, ""])


@dataclass(frozen=True)
class Report:
    """Where a benchmark's results go for one model: its docs/benchmarks.md section and its plot under
    docs/results/ (a raw answers file goes beside it, `plot.with_suffix(".json")`). The embedded model's keep
    the plain names; any other model's carry its name, so both stay side by side."""

    section: str
    heading: str
    plot: Path

    @classmethod
    def of(cls, name: str, heading: str, spec: str | None) -> "Report":
        if spec is None:
            return cls(name, heading, RAW / f"{name}.png")
        model = Path(spec).name.removesuffix(".gguf")
        slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")
        return cls(f"{name}-{slug}", f"{heading}: {model}", RAW / f"{name}-{slug}.png")


def link(path: Path) -> str:
    """`path` as docs/benchmarks.md links to it (relative to that file, e.g. results/speed.png)."""
    return path.relative_to(RESULTS.parent).as_posix()


def write_section(
    name: str,
    heading: str,
    body: str,
    device: torch.device,
    reduced: str | None,
    smoke: bool = False,
    raw: object = None,
) -> Path:
    """Replace the `<!-- bench:NAME -->` section of docs/benchmarks.md (appended if absent), leaving the rest.

    The section records the command line, date and machine. A run with settings other than the full
    run's is labelled with them: a smoke run (sizes that only exercise the script) as not a result. `raw`
    (JSON-ready measurements) goes to docs/results/NAME.json with the same command, date and machine, and
    the section links it.
    """
    header = [f"### {heading}", ""]
    if smoke:
        header += [f"> **Smoke run, not a result**: {reduced}. Rerun the command with its defaults.", ""]
    elif reduced:
        header += [f"> **Reduced run**: {reduced}. Measured as the full run measures, over fewer settings.", ""]
    run = {
        "command": command_line(),
        "date": f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        "machine": machine(device),
    }
    header += [f"- Command: `{run['command']}`", f"- Date: {run['date']}", f"- Machine: {run['machine']}"]
    if raw is not None and not smoke:
        raw_path = RAW / f"{name}.json"
        write_atomic(raw_path, json.dumps({**run, "reduced": reduced, "results": raw}, indent=1) + "\n")
        header.append(f"- Raw: [{link(raw_path)}]({link(raw_path)})")
    header.append("")
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    section = "\n".join([start, *header, body.strip(), end])
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    write_atomic(RESULTS, text)
    return RESULTS


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


def tag(text: str) -> str:
    if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", text):
        raise argparse.ArgumentTypeError(f"'{text}' is not lowercase letters, digits and single dashes")
    return text
