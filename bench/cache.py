"""Saved caches, each kind `cache build` can write: file size, load time and query time to
first token per kind of cache and storage dtype, against re-running a fullkv prefill with the question.

python bench/cache.py [--tokens N ...] [--repeats 3] [--budget B] [--stored S] [--kinds K ...] [--fresh-process]
    [--model M] [--no-write]

Kinds, each at `ask`'s default budget (fastkv's own, 30%,2048) unless --budget says otherwise:
- fullkv: every token, answers use them all (the yardstick of file sizes);
- kvzip: `cache build`'s default, reconstruction-scored once for every question at kvzip's own budget;
- kvzip + TSP: the same, its scores also choosing the 50% of the tokens the deeper layers run on (`--tsp-rate 50%`);
- question-blind: fastkv at the budget, built without the question (`cache build --question-blind`);
- two-stage: fastkv at --stored (default: 3× the budget, capped at 100%, as bench/accuracy.py builds it),
  each query re-selects down to the budget with its own question (`cache build --query-budget`);
- query-aware: paused at fastkv's TSP layer, each query resumes it as `ask` would (`cache build`'s default);
- every token: fullkv's cache, each query re-selects down to the budget with its own question
  (`--method fullkv --query-budget`: SnapKV's answer, a question prefill of only its own tokens).
Each is saved as float16 and in every quantized dtype (int8, int6, int4), the query-aware one also coded.
`--kinds` measures only those (fullkv always). Beside the re-prefill, `fastkv ask` with its defaults is timed
to the first token, and each kind's build prefill once, against fullkv's. Each length's table is printed,
and written to docs/benchmarks.md, as soon as it is complete: a run stopped early keeps the lengths it
finished.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

from answers.variants import STORED_FACTOR, stored_budget
from common import MIB, Report, Table, cell, interleaved, medians, prompt_ids, reduced_run, write_section
from safetensors import safe_open

from core.documents import read_documents
from core.engine import Engine
from core.generation import Decoding
from core.methods import BUILD_METHOD, DEFAULT_METHOD, Budget, make_method
from core.options import BuildPlan
from core.saved import SavedContext
from core.storage import CODED, codec_for, load_cache, save_cache
from core.storage.quant import BITS

EMBEDDED_TOKENS = [7500]  # what fits the embedded model's 8K window with the 256 tokens left for a question
MODEL_TOKENS = [2048, 8192, 16384]  # any other model (the targets are judged at 8K on the benchmark model)
DEFAULT_REPEATS = 3
QUESTION = "How long does a licensee have to cure a violation after being notified?"
FIRST_TOKEN = Decoding(max_new_tokens=1)
STORAGE = ("float16", *BITS)  # float16, then every quantized dtype `cache build` offers; and coded, query-aware
REPREFILL = "fullkv re-prefill"
ASK = "ask (defaults)"
# the default's targets: the file ≤ 30% of the float16 fullkv file; query TTFT ≥ 50× faster than a fullkv re-prefill
# (≥ 20× at 2K tokens and less) and faster than `ask`
KVZIP_TSP_RATE = "50%"  # as bench/frontier.py measured its answers
TARGETS = {"size_share": 0.30, "speedup": 50.0, "short_speedup": 20.0, "short_tokens": 2048}


@dataclass(frozen=True)
class Kind:
    """One kind of saved cache: how `cache build` makes it."""

    name: str
    method: str
    budget: Budget | None = None  # what the build keeps (None: the method's own)
    query_budget: Budget | None = None  # what each query re-selects to (two-stage, every token)
    query_aware: bool = False
    tsp_rate: str | None = None  # kvzip + TSP: what its scores propagate past the TSP layer

    def build_key(self) -> tuple:
        """Builds that differ only in the query budget they record run the same prefill."""
        return self.method, self.budget, self.query_aware, self.tsp_rate

    def make(self):
        """The method `cache build` runs for this kind."""
        return make_method(self.method, budget=self.budget, **({"tsp_rate": self.tsp_rate} if self.tsp_rate else {}))


def kinds(budget: Budget, stored: Budget) -> list[Kind]:
    return [
        Kind("fullkv", "fullkv"),
        Kind("kvzip", BUILD_METHOD),
        Kind("kvzip + TSP", BUILD_METHOD, tsp_rate=KVZIP_TSP_RATE),
        Kind("question-blind", DEFAULT_METHOD, budget),
        Kind("two-stage", DEFAULT_METHOD, stored, query_budget=budget),
        Kind("query-aware", DEFAULT_METHOD, budget, query_aware=True),
        Kind("every token", "fullkv", query_budget=budget),
    ]


def write_document(engine: Engine, tokens: int, folder: Path) -> Path:
    """A real-text document of about `tokens` tokens, as a user would pass it."""
    text = engine.loaded.tokenizer.decode(prompt_ids(engine.loaded.tokenizer, tokens, "cpu"))
    path = folder / f"document-{tokens}.txt"
    path.write_text(text, encoding="utf-8")
    return path


def build_all(
    engine: Engine, document: Path, folder: Path, made: list[Kind]
) -> tuple[dict[str, dict[str, Path]], dict[str, float]]:
    """Every kind built once and saved in every storage dtype -> ({kind: {dtype: path}}, {kind: prefill s}).
    A kind that differs from an earlier one only by its query budget takes that prefill with its own
    manifest, exactly what engine.build would return."""
    builds: dict[tuple, SavedContext] = {}
    files: dict[str, dict[str, Path]] = {}
    for kind in made:
        if kind.build_key() not in builds:
            builds[kind.build_key()] = engine.build(
                read_documents([str(document)]), BuildPlan(kind.make(), query_aware=kind.query_aware)
            )
        saved = builds[kind.build_key()]
        query_budget = None if kind.query_budget is None else str(kind.query_budget)
        manifest = replace(saved.manifest, query_budget=query_budget)
        files[kind.name] = {}
        for dtype in (*STORAGE, CODED) if kind.query_aware else STORAGE:
            path = folder / f"{kind.name.replace(' ', '-')}-{dtype}.fkv"
            save_cache(path, saved.cache, manifest, dtype, True, engine.runner)
            files[kind.name][dtype] = path
    return files, {kind.name: builds[kind.build_key()].stats.prefill_s for kind in made}


def load(engine: Engine, path: Path) -> None:
    """What `cache query` does first: read, verify and (quantized dtypes) de-quantize the file onto the model's device."""
    load_cache(path, engine.loaded.device, engine.loaded.dtype, engine.runner)


def in_memory(engine: Engine, path: Path) -> tuple[int, int, Callable[[], object], Callable[[], object] | None]:
    """The two ways to hold a loaded cache between questions: de-quantized (what load_cache
    does) or as stored, de-quantizing a fresh copy for each question -> (bytes de-quantized, bytes as
    stored, each question's copy one way, the other way; None for a float file)."""
    cache, manifest = load_cache(path, engine.loaded.device, engine.loaded.dtype, engine.runner)
    resident = sum(layer.nbytes for layer in cache.layers) + (0 if cache.paused is None else cache.paused.nbytes)
    with safe_open(str(path), framework="pt") as f:
        stored = {name: f.get_tensor(name) for name in f.keys()}
    stored_bytes = sum(tensor.nbytes for tensor in stored.values())
    if manifest.storage.quantization is None:
        return resident, stored_bytes, cache.clone, None
    decode = codec_for(manifest.storage.dtype).decode
    return resident, stored_bytes, cache.clone, partial(decode, stored, manifest, engine.runner)


def query_from_disk(engine: Engine, path: Path) -> None:
    """What `cache query` does for its first question: load the file, append the question, first token."""
    engine.query(engine.load_saved(path), QUESTION, decoding=FIRST_TOKEN)


def ask_defaults(engine: Engine, document: Path) -> None:
    """`fastkv ask DOC QUESTION` at its defaults, to the first token: the one-pass alternative."""
    engine.ask(read_documents([str(document)]), QUESTION, decoding=FIRST_TOKEN)


def ask_again(engine: Engine, document: Path) -> None:
    """The alternative to a saved cache: read the document and prefill it with the question again, fullkv."""
    engine.ask(read_documents([str(document)]), QUESTION, make_method("fullkv"), FIRST_TOKEN)


def fresh_process_seconds(path: Path, repeats: int) -> float:
    """Wall time of `fastkv cache query FILE QUESTION --max-new-tokens 1` in a new process (imports,
    model load, cache load, question, first token), median of `repeats`."""
    command = [sys.executable, "-m", "fastkv_cli", "cache", "query", str(path), QUESTION]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([*command, "--max-new-tokens", "1", "--json", "--quiet"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@dataclass
class Row:
    """One kind in one storage dtype at one length."""

    kind: str
    dtype: str
    file_bytes: int
    share: float  # of the float16 fullkv file
    load_s: float
    query_s: float
    speedup: float  # fullkv re-prefill seconds over query_s
    build_s: float = 0.0  # the build's prefill, once
    resident_bytes: int = 0  # the loaded cache, de-quantized to the model's dtype
    stored_bytes: int = 0  # its tensors as the file stores them (codes, scales, zero points)
    copy_s: float | None = None  # each question's fresh copy of the de-quantized cache
    dequantize_s: float | None = None  # each question's copy made by de-quantizing the stored tensors
    fresh_s: float | None = None


def measure(engine: Engine, tokens: int, made: list[Kind], repeats: int, fresh: bool) -> tuple[list[Row], float, float]:
    """Every kind × storage dtype at `tokens` -> (rows, fullkv re-prefill seconds, `ask` seconds); medians of
    `repeats` interleaved runs of every load, query, the re-prefill and `ask`."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        document = write_document(engine, tokens, folder)
        files, build_s = build_all(engine, document, folder, made)
        fns = {REPREFILL: partial(ask_again, engine, document), ASK: partial(ask_defaults, engine, document)}
        held = {}
        for name, paths in files.items():
            for dtype, path in paths.items():
                fns[f"load {name} {dtype}"] = partial(load, engine, path)
                fns[f"query {name} {dtype}"] = partial(query_from_disk, engine, path)
                held[name, dtype] = in_memory(engine, path)
                fns[f"copy {name} {dtype}"] = held[name, dtype][2]
                if held[name, dtype][3] is not None:
                    fns[f"dequantize {name} {dtype}"] = held[name, dtype][3]
        seconds = medians(interleaved(fns, repeats))
        full = files["fullkv"]["float16"].stat().st_size
        rows = []
        for name, paths in files.items():
            for dtype, path in paths.items():
                size, query_s = path.stat().st_size, seconds[f"query {name} {dtype}"]
                fresh_s = fresh_process_seconds(path, repeats) if fresh else None
                resident, stored = held[name, dtype][:2]
                rows.append(
                    Row(name, dtype, size, size / full, seconds[f"load {name} {dtype}"], query_s,
                        seconds[REPREFILL] / query_s, build_s[name], resident, stored,
                        seconds[f"copy {name} {dtype}"], seconds.get(f"dequantize {name} {dtype}"), fresh_s)
                )  # fmt: skip
    return rows, seconds[REPREFILL], seconds[ASK]


def length_table(
    rows: list[Row], reprefill_s: float, ask_s: float, tokens: int, model: str, budget: Budget, stored: Budget
) -> Table:
    fresh = any(row.fresh_s is not None for row in rows)
    headers = ["cache", "storage", "build prefill s", "file MiB", "% of float16 fullkv file", "load s"]
    headers += ["query TTFT s", "× fullkv re-prefill", "held MiB: de-quantized / as stored"]
    headers += ["per question: copy s / de-quantize s"] + (["fresh process s"] if fresh else [])
    table = Table(title=f"Saved caches at {tokens} tokens ({model}), budget {budget}", headers=headers, text_columns=2)
    for name, seconds in ((f"{REPREFILL} (ask with the question)", reprefill_s), (ASK, ask_s)):
        table.rows.append([name, "—", "—", "—", "—", "—", cell(seconds, 2), cell(reprefill_s / seconds, 1), "—", "—"])
        table.rows[-1] += ["—"] if fresh else []
    for row in rows:
        table.rows.append([row.kind, row.dtype, cell(row.build_s, 1), cell(row.file_bytes / MIB, 1),
                           cell(100 * row.share, 1, "%"), cell(row.load_s, 3), cell(row.query_s, 3),
                           cell(row.speedup, 1),
                           f"{row.resident_bytes / MIB:.1f} / {row.stored_bytes / MIB:.1f}",
                           f"{row.copy_s:.3f} / {cell(row.dequantize_s, 3)}"])  # fmt: skip
        table.rows[-1] += [cell(row.fresh_s, 2)] if fresh else []
    table.caption = (
        f"fullkv: every token; kvzip: reconstruction-scored at kvzip's own budget (+ TSP: propagating "
        f"{KVZIP_TSP_RATE}); question-blind: fastkv {budget} "
        f"without the question; two-stage: fastkv {stored}, "
        f"each query re-selects to {budget}; query-aware: paused at the TSP layer, each query resumes it as ask; "
        f"every token: fullkv's cache, each query re-selects to {budget} with its question. "
        "Load: load_cache onto the model's device and dtype (quantized dtypes de-quantized). Query TTFT: load the file + "
        "prefill the question over the cached context (re-selecting where the kind does) + first token, model "
        f"already loaded. {REPREFILL}: read + tokenize + prefill document and question + first token; {ASK}: the "
        "same with ask's defaults (fastkv). Build prefill: the kind's engine.build, once. Medians of "
        "interleaved runs. Held: the loaded cache kept between questions, de-quantized (what cache query and the "
        "server do) or as stored; per question: the fresh copy each question starts from, a copy of the "
        "de-quantized cache or de-quantizing the stored tensors with their codec's decode, its per-tensor checks "
        "included."
        + (" Fresh process: `python -m fastkv_cli cache query FILE Q --max-new-tokens 1` wall time." if fresh else "")
    )
    return table


def verdicts(rows: list[Row], tokens: int, ask_s: float) -> list[str]:
    """The targets per candidate (every kind but fullkv, in every dtype): PASS when it meets all three."""
    lines = []
    speedup = TARGETS["short_speedup"] if tokens <= TARGETS["short_tokens"] else TARGETS["speedup"]
    for row in rows:
        if row.kind == "fullkv":
            continue
        checks = [
            (f"file {100 * row.share:.1f}% of float16 fullkv (≤ {100 * TARGETS['size_share']:.0f}%)",
             row.share <= TARGETS["size_share"]),
            (f"query TTFT {row.speedup:.1f}× faster than {REPREFILL} (≥ {speedup:g}×)", row.speedup >= speedup),
            (f"query {row.query_s:.3f} s vs ask {ask_s:.2f} s", row.query_s < ask_s),
        ]  # fmt: skip
        parts = "; ".join(f"{text}: {'PASS' if ok else 'MISS'}" for text, ok in checks)
        lines.append(f"{'PASS' if all(ok for _, ok in checks) else 'MISS'} {row.kind} {row.dtype} at {tokens}: {parts}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokens", type=int, nargs="+", help="document lengths (default: 7500; 2048 8192 16384 with --model)"
    )
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="interleaved runs")
    parser.add_argument("--budget", help=f"final budget per answer (default: {DEFAULT_METHOD}'s own, as ask)")
    parser.add_argument("--stored", help="what the two-stage file stores (default: 3× the budget, at most 100%%)")
    parser.add_argument("--kinds", nargs="+", help="only these kinds (fullkv is always measured)")
    parser.add_argument("--fresh-process", action="store_true", help="also time `cache query` in a new process")
    parser.add_argument("--model", help="model to load (default: the embedded SmolLM2-135M)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    budget = Budget.parse(args.budget) if args.budget else make_method(DEFAULT_METHOD).budget
    stored = Budget.parse(args.stored) if args.stored else stored_budget(budget, STORED_FACTOR)
    made = [kind for kind in kinds(budget, stored) if not args.kinds or kind.name in {"fullkv", *args.kinds}]
    full_run = EMBEDDED_TOKENS if args.model is None else MODEL_TOKENS
    lengths = args.tokens or full_run
    model_load_s = medians(interleaved({"load": partial(Engine.load, args.model)}, args.repeats))["load"]
    engine = Engine.load(args.model)
    report = Report.of("cache", "Saved caches", engine.loaded.spec)
    done: list[str] = []
    raw: dict = {"model_load_s": model_load_s, "lengths": []}
    for tokens in lengths:
        rows, reprefill_s, ask_s = measure(engine, tokens, made, args.repeats, args.fresh_process)
        raw["lengths"].append(
            {"tokens": tokens, "reprefill_s": reprefill_s, "ask_s": ask_s, "rows": [asdict(row) for row in rows]}
        )
        table = length_table(rows, reprefill_s, ask_s, tokens, engine.loaded.name, budget, stored)
        lines = verdicts(rows, tokens, ask_s)
        table.print()
        print(*lines, sep="\n", flush=True)
        done += [table.markdown(), *[f"- {line}" for line in lines], ""]
        if not args.no_write:
            every_kind = [kind.name for kind in kinds(budget, stored)]
            reduced = reduced_run(
                tokens=(lengths, full_run), repeats=(args.repeats, DEFAULT_REPEATS),
                kinds=([kind.name for kind in made], every_kind),
            )  # fmt: skip
            finished = lengths[: lengths.index(tokens) + 1]
            if finished != lengths:  # a run stopped here still says which lengths it reached
                unfinished = (
                    f"only {' '.join(map(str, finished))} of {' '.join(map(str, lengths))} tokens measured so far"
                )
                reduced = f"{reduced}; {unfinished}" if reduced else unfinished
            notes = [
                f"Targets: file ≤ {100 * TARGETS['size_share']:.0f}% of the float16 fullkv file; query TTFT "
                f"≥ {TARGETS['speedup']:g}× faster than a fullkv re-prefill ({TARGETS['short_speedup']:g}× at "
                f"{TARGETS['short_tokens']} tokens and less) and faster than `ask`. Each length is judged by all three.",
                f"Model load (Engine.load): median {model_load_s:.2f} s.",
                "",
            ]
            body, device = "\n".join(notes + done), engine.loaded.device
            path = write_section(report.section, report.heading, body, device, reduced, raw=raw)
            print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
