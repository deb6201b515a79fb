"""Saved caches: time to first token of `cache query` against re-running a full prefill, file sizes, load times.

python bench/cache.py [--tokens 7500] [--repeats 3] [--budget 10%] [--stored 30%] [--model M] [--no-write]
"""

import argparse
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from common import MIB, Table, cell, interleaved, medians, prompt_ids, reduced_run, write_section

from core.documents import read_documents
from core.engine import Engine, SavedContext
from core.generation import Decoding
from core.methods import Budget, make_method
from core.stats import RunStats
from core.store import load_cache, save_cache

DEFAULT_TOKENS = 7500  # what fits the 8K window with the 256 tokens a saved context leaves for a question
DEFAULT_REPEATS = 3
QUESTION = "How long does a licensee have to cure a violation after being notified?"
FIRST_TOKEN = Decoding(max_new_tokens=1)
STORAGE = ("float16", "int8", "int4")
TARGETS = {"speedup": 50.0, "size_share": 0.12, "cache_load_s": 0.5, "model_load_s": 2.0}


def write_document(engine: Engine, tokens: int, folder: Path) -> Path:
    """A real-text document of about `tokens` tokens, as a user would pass it."""
    text = engine.loaded.tokenizer.decode(prompt_ids(engine.loaded.tokenizer, tokens, "cpu"))
    path = folder / "document.txt"
    path.write_text(text, encoding="utf-8")
    return path


def build(
    engine: Engine,
    document: Path,
    path: Path,
    method: str,
    budget: str | None,
    query_budget: str | None = None,
    query_aware: bool = False,
) -> int:
    method_obj = make_method(method) if budget is None else make_method(method, budget=budget)
    final = None if query_budget is None else Budget.parse(query_budget)
    saved = engine.build(read_documents([str(document)]), method_obj, final, query_aware=query_aware)
    for dtype in STORAGE:  # the same cache in every storage dtype, beside PATH
        save_cache(stored_path(path, dtype), saved.cache, saved.manifest, dtype, force=True)
    return save_cache(path, saved.cache, saved.manifest, "float16", force=True)


def stored_path(path: Path, dtype: str) -> Path:
    return path.with_name(f"{path.stem}-{dtype}.fkv")


def storage_table(engine: Engine, files: dict[str, Path], fullkv_bytes: int, repeats: int, title: str) -> Table:
    """Kinds × storage dtypes: file share of the float16 fullkv file, load time and query TTFT."""
    engine_fns = {}
    for name, path in files.items():
        for dtype in STORAGE:
            engine_fns[f"load {name} {dtype}"] = partial(load_cache, stored_path(path, dtype))
            if name != "fullkv":
                engine_fns[f"query {name} {dtype}"] = partial(query_from_disk, engine, stored_path(path, dtype))
    seconds = medians(interleaved(engine_fns, repeats))
    table = Table(
        title=title, headers=["cache", "storage", "file MiB", "% of float16 fullkv file", "load s", "query TTFT s"]
    )
    for name, path in files.items():
        for dtype in STORAGE:
            size = stored_path(path, dtype).stat().st_size
            query = "—" if name == "fullkv" else cell(seconds[f"query {name} {dtype}"], 3)
            table.rows.append([name, dtype, cell(size / MIB, 1), cell(100 * size / fullkv_bytes, 1, "%"),
                               cell(seconds[f"load {name} {dtype}"], 3), query])  # fmt: skip
    return table


def query_from_disk(engine: Engine, path: Path) -> None:
    """What `cache query` does for its first question: load the file, append the question, first token."""
    start = time.perf_counter()
    cache, manifest = load_cache(path, engine.loaded.device, engine.loaded.dtype)
    saved = SavedContext(cache, manifest, RunStats(cache_load_s=time.perf_counter() - start))
    engine.query(saved, QUESTION, decoding=FIRST_TOKEN)


def ask_again(engine: Engine, document: Path, method: str) -> None:
    """The alternative to a saved cache: read the document and prefill it with the question again."""
    engine.ask(read_documents([str(document)]), QUESTION, make_method(method), FIRST_TOKEN)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="document length in tokens")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="interleaved runs")
    parser.add_argument("--budget", default="10%", help="final budget per answer")
    parser.add_argument("--stored", default="30%", help="what the two-stage file stores before re-selection")
    parser.add_argument("--model", help="model to load (default: the embedded SmolLM2-135M)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    model_loads = medians(interleaved({"load": partial(Engine.load, args.model)}, args.repeats))["load"]
    engine = Engine.load(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        document = write_document(engine, args.tokens, folder)
        single, two_stage, aware = (
            f"fastkv {args.budget}",
            f"fastkv {args.stored} → {args.budget}",
            f"fastkv {args.budget} query-aware",
        )
        files = {
            "fullkv": folder / "fullkv.fkv",
            single: folder / "fastkv.fkv",
            two_stage: folder / "two-stage.fkv",
            aware: folder / "query-aware.fkv",
        }
        sizes = {
            "fullkv": build(engine, document, files["fullkv"], "fullkv", None),
            single: build(engine, document, files[single], "fastkv", args.budget),
            two_stage: build(engine, document, files[two_stage], "fastkv", args.stored, args.budget),
            aware: build(engine, document, files[aware], "fastkv", args.budget, query_aware=True),
        }
        query_files = {name: path for name, path in files.items() if name != "fullkv"}
        fns = {"fullkv ask (re-prefill)": partial(ask_again, engine, document, "fullkv")}
        fns |= {f"query {name}": partial(query_from_disk, engine, path) for name, path in query_files.items()}
        fns |= {f"load {name}": partial(load_cache, path) for name, path in files.items()}
        seconds = medians(interleaved(fns, args.repeats))
        fresh = {name: fresh_process_seconds(path, args.repeats) for name, path in query_files.items()}
        storage = storage_table(
            engine,
            files,
            sizes["fullkv"],
            args.repeats,
            f"Storage dtypes at {args.tokens} tokens ({engine.loaded.name})",
        )
        storage.caption = (
            "The same caches saved as float16, int8 and int4 (group-wise affine, groups of 64; de-quantized on "
            f"load). Load: load_cache to CPU; query TTFT as above. Medians of {args.repeats} interleaved runs."
        )
    full_ttft = seconds["fullkv ask (re-prefill)"]
    table = Table(
        title=f"Saved caches at {args.tokens} tokens ({engine.loaded.name}, float16 files)",
        headers=[
            "cache",
            "file MiB",
            "% of fullkv file",
            "load s",
            "query TTFT s",
            "× fullkv re-prefill",
            "fresh process s",
        ],
    )
    table.rows.append(["fullkv (re-prefill with the question)", cell(sizes["fullkv"] / MIB, 1), "100.0%",
                       cell(seconds["load fullkv"], 3), cell(full_ttft, 2), "1.0", "—"])  # fmt: skip
    for name in query_files:
        table.rows.append([
            name, cell(sizes[name] / MIB, 1), cell(100 * sizes[name] / sizes["fullkv"], 1, "%"),
            cell(seconds[f"load {name}"], 3), cell(seconds[f"query {name}"], 3),
            cell(full_ttft / seconds[f"query {name}"], 1), cell(fresh[name], 2),
        ])  # fmt: skip
    verdicts = [
        ("query TTFT ≥ 50× faster than re-running a fullkv prefill", full_ttft / seconds[f"query {single}"], TARGETS["speedup"], True),
        (f"file ≤ 12% of the fullkv file at --budget {args.budget}", sizes[single] / sizes["fullkv"], TARGETS["size_share"], False),
        ("cache load ≤ 0.5 s", seconds[f"load {single}"], TARGETS["cache_load_s"], False),
        ("model load (converted embedded model) ≤ 2 s", model_loads, TARGETS["model_load_s"], False),
    ]  # fmt: skip
    lines = [
        f"{'PASS' if (v >= t if higher else v <= t) else 'MISS'} {what} (measured {v:.3g})"
        for what, v, t, higher in verdicts
    ]
    table.caption = (
        f"Query TTFT: load the file + prefill the question over the cached context + first token, model already "
        f"loaded; fullkv re-prefill: read + tokenize + prefill document and question + first token. Medians of "
        f"{args.repeats} interleaved runs. Fresh process: `python -m fastkv_cli cache query FILE Q --max-new-tokens 1` "
        f"wall time, imports and model load included. Model load (Engine.load): median {model_loads:.2f} s."
    )
    table.print()
    storage.print()
    print(*lines, sep="\n")
    if not args.no_write:
        reduced = reduced_run(tokens=(args.tokens, DEFAULT_TOKENS), repeats=(args.repeats, DEFAULT_REPEATS))
        body = "\n".join([table.markdown(), *[f"- {line}" for line in lines], "", storage.markdown(), ""])
        path = write_section("cache", "Saved caches", body, engine.loaded.device, reduced)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
