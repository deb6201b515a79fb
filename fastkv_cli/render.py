"""Rich rendering on stderr: progress of long steps, the loads a run waited for, and the stats table of an
answer."""

import json
import sys
from contextlib import contextmanager
from statistics import mean

from rich.console import Console, Group
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

stderr = Console(stderr=True)
stdout = Console()
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
        disable=quiet or not stderr.is_interactive,
    )
    tasks: dict[str, int] = {}

    def report(step: str, done: int, total: int) -> None:
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


def dropped(tokens: int, estimated: bool) -> str:
    if not tokens:
        return ""
    return f" (about {tokens:,} dropped)" if estimated else f" ({tokens:,} dropped)"


def kept_per_layer(kept: list[int], paused_layer: int | None) -> str:
    """Tokens each layer keeps; a paused (query-aware) cache keeps every token up to the paused layer and
    nothing deeper, where each question's own selection goes."""
    if paused_layer is None:
        return f"min {min(kept):,} · mean {mean(kept):,.0f} · max {max(kept):,}"
    return (
        f"every token in layers 0-{paused_layer}; layers {paused_layer + 1}-{len(kept) - 1}: what each question selects"
    )


def loads_line(load_s: float | None, cache_load_s: float | None) -> str:
    """The loads a run waited for, e.g. "model load 0.21 s · cache load 0.44 s"; "" when it waited for none."""
    loads = (("model load", load_s), ("cache load", cache_load_s))
    return " · ".join(f"{name} {seconds(value)}" for name, value in loads if value is not None)


def stats_table(answer) -> Table:
    """An answer's own timings and sizes (the loads that later answers reuse are a line of their own)."""
    s = answer.stats
    table = Table(title=escape(f"{answer.model} · {answer.method}"), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("read", seconds(s.read_s)),
        ("tokenize", seconds(s.tokenize_s)),
        ("prefill", seconds(s.prefill_s)),
        ("time to first token", seconds(s.ttft_s)),
        (
            "decode",
            "—" if s.decode_tokens_per_s is None else f"{s.decode_tokens_per_s:.1f} tok/s ({s.new_tokens} tokens)",
        ),
        ("context tokens", f"{s.context_tokens:,}" + dropped(s.dropped_tokens, s.dropped_tokens_estimated)),
    ]
    if s.kept_tokens_per_layer:
        kept = s.kept_tokens_per_layer
        rows.append(("kept tokens / layer", kept_per_layer(kept, None)))
    shrink = next((i for i in range(1, len(s.layer_tokens)) if s.layer_tokens[i] < s.layer_tokens[i - 1]), None)
    if shrink is not None:
        rows.append(
            ("propagated", f"{s.layer_tokens[shrink]:,} of {s.layer_tokens[0]:,} tokens after layer {shrink - 1}")
        )
    rows.append(("KV cache", f"{s.kv_bytes_kept / MIB:.1f} MiB kept of {s.kv_bytes_full / MIB:.1f} MiB full"))
    for name, value in rows:
        table.add_row(name, value)
    return table


def build_table(summary: dict) -> Table:
    """`cache build`'s summary on stderr, as `ask` shows its stats: what was prefilled, kept and written."""
    title = escape(f"{summary['output']} · {summary['model']} · {summary['method']}")
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    kept = summary["kept_tokens_per_layer"]
    kind = summary["kind"]
    if kind == "query-aware":
        kind += f" (paused after layer {summary['paused_layer']}; each question resumes at budget {summary['budget']})"
    elif kind == "two-stage":
        kind += f" (each question re-selects down to {summary['query_budget']})"
    stored = storage(summary["cache_dtype"], summary["quantization"], summary["paused_layer"] is not None)
    rows = [
        ("model load", seconds(summary["load_s"])),
        ("read", seconds(summary["read_s"])),
        ("prefill", seconds(summary["prefill_s"])),
        (
            "context tokens",
            f"{summary['context_tokens']:,}" + dropped(summary["dropped_tokens"], summary["dropped_tokens_estimated"]),
        ),
        ("kept tokens / layer", kept_per_layer(kept, summary["paused_layer"]) if kept else "—"),
        ("kind of cache", kind),
        ("storage", stored),
        (
            "file",
            f"{summary['file_bytes'] / MIB:.1f} MiB, {summary['file_share_of_fullkv_float16']:.0%} of a float16 "
            f"cache of every token ({summary['fullkv_float16_bytes'] / MIB:.1f} MiB)",
        ),
        ("write", seconds(summary["save_s"])),
    ]
    for name, value in rows:
        table.add_row(name, escape(value))
    return table


def print_json(data: dict) -> None:
    """One JSON object on one line of stdout."""
    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def page_bar(share: float, width: int = 20) -> str:
    filled = round(share * width)
    return "█" * filled + "·" * (width - filled)


def query_selection(manifest: dict) -> str:
    if manifest["paused_layer"] is not None:
        return (
            f"query-aware: paused after layer {manifest['paused_layer']}; each question resumes the prefill "
            f"as `ask` at budget {manifest['method']['parameters']['budget']}"
        )
    if manifest["query_budget"] is not None:
        return f"two-stage: each question re-selects the stored tokens down to {manifest['query_budget']}"
    return "none: answers use every stored token"


def policy_line(manifest: dict, reconstruction_scored: bool) -> str:
    """The method's settings in tokens for this context, as the build resolved them (the load checked the counts);
    `reconstruction_scored`: kvzip's, which scores by the model repeating the context and always keeps its window."""
    policy = manifest["policy"] or {}
    parts = []
    if "budget_tokens" in policy:
        parts.append(f"{policy['budget_tokens']:,} tokens per layer")
    if "propagated_tokens" in policy:
        parts.append(f"{policy['propagated_tokens']:,} propagated after layer {policy.get('tsp_layer', '?')}")
    if "window" in policy:
        window = policy["window"]
        if reconstruction_scored:
            parts.append(f"scored by the model repeating the context · the last {window} tokens always kept")
        elif window is None:
            parts.append("scored by each question's tokens")
        else:
            parts.append(f"scored by the last {window} tokens")
    return " · ".join(parts) or "—"


def storage(dtype: str, quantization: dict | None, paused: bool) -> str:
    """A cache's storage as built or read, e.g. "int4 in groups of 64, hidden states at 8 bits"."""
    if quantization is None:
        return dtype
    if dtype == "coded":
        return "coded: int6's rounding error, one step a tensor, entropy-coded"
    text = f"{dtype} in groups of {quantization['group_size']}"
    if paused and quantization["hidden_bits"] != quantization["bits"]:
        text += f", hidden states at {quantization['hidden_bits']} bits"
    if len(set(widths := quantization["layer_bits"])) > 1:
        text += f", keys and values at {min(widths)} to {max(widths)} bits by layer"
    return text


def cache_info_view(info: dict) -> Group:
    """Manifest, sizes and per-page coverage of a .fkv file."""
    manifest, model = info["manifest"], info["manifest"]["model"]
    method = manifest["method"]
    parameters = ", ".join(f"{key}={value}" for key, value in method["parameters"].items())
    kept = info["kept_tokens_per_layer"]
    stored = storage(manifest["dtype"], manifest["quantization"], manifest["paused_layer"] is not None)
    summary = Table(show_header=False, box=None)
    summary.add_column(style="bold")
    summary.add_column()
    for name, value in [
        (
            "model",
            f"{model['name']} ({model['model_type']}, {model['num_layers']} layers, {model['num_kv_heads']} KV heads)",
        ),
        ("method", f"{method['name']} ({parameters})"),
        ("policy", policy_line(manifest, info["reconstruction_scored"])),
        ("query selection", query_selection(manifest)),
        ("steering questions", str(manifest["steering_questions"])),
        (
            "context tokens",
            f"{manifest['context_tokens']:,}"
            + (f" ({manifest['dropped_tokens']:,} dropped)" if manifest["dropped_tokens"] else ""),
        ),
        ("kept tokens / layer", kept_per_layer(kept, manifest["paused_layer"])),
        (
            "file",
            f"{info['file_bytes'] / MIB:.1f} MiB, {stored}, format v{manifest['format_version']}, checksum ok",
        ),
        ("created", f"{manifest['created']} by fastkv {manifest['fastkv_version']}"),
    ]:
        summary.add_row(name, escape(value))  # names and paths from the file are text, not markup
    paused = manifest["paused_layer"]
    layers = (
        "layers and KV heads" if paused is None else f"KV heads and layers 0-{paused}: each question selects past them"
    )
    pages = Table(title=f"share of each page's tokens kept (mean over {layers})", title_justify="left")
    for column in ("document", "page", "tokens", "kept", ""):
        pages.add_column(column, justify="right" if column in ("page", "tokens", "kept") else "left")
    for document, coverage in zip(manifest["documents"], info["page_coverage"], strict=True):
        for page, ((start, end), share) in enumerate(zip(document["page_token_spans"], coverage, strict=True), 1):
            pages.add_row(escape(document["name"]), str(page), f"{end - start:,}", f"{share:.0%}", page_bar(share))
    return Group(summary, pages)


def stream_to_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def show(answer, json: bool, quiet: bool) -> None:
    """After a streamed answer: its JSON line (--json), else the line end; then on stderr the line of the loads
    it waited for, if any (only the first answer of a process, or from a loaded cache, has them: the later ones
    reused them), and its stats table. Nothing reaches stderr before the answer is done, so that an error stays
    one line and `| head` or Ctrl-C leave no table behind."""
    if json:
        print_json(answer.to_dict())
    elif not answer.text.endswith("\n"):
        stream_to_stdout("\n")
    if not quiet:
        if line := loads_line(answer.stats.load_s, answer.stats.cache_load_s):
            stderr.print(line, highlight=False)
        stderr.print(stats_table(answer))


def show_built(summary: dict, json: bool, quiet: bool) -> None:
    """`cache build`'s summary: its JSON line (--json); the table and where the file went on stderr."""
    if json:
        print_json(summary)
    if not quiet:
        stderr.print(build_table(summary))
        stderr.print(f"wrote {summary['output']} ({summary['file_bytes'] / MIB:.1f} MiB)", highlight=False)


def show_info(info: dict, json: bool) -> None:
    """`cache info`: its JSON line (--json), else the view on stdout."""
    if json:
        print_json(info)
    else:
        stdout.print(cache_info_view(info))
