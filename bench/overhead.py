"""Overhead of fastkv's own layer loop: the runner's full-KV prefill against the HF model's forward, same tokens.

python bench/overhead.py [--lengths 2048 4096 7680] [--repeats 3] [--model M] [--device D] [--no-write]
"""

import argparse
from functools import partial

from common import Table, cell, device_sync, hf_logits, interleaved, medians, prompt_ids, reduced_run, write_section

from core.engine import Engine
from core.methods import FullKV

DEFAULT_LENGTHS = [2048, 4096, 7680]
DEFAULT_REPEATS = 3
TARGET_RATIO = 1.05


def runner_logits(runner, ids):
    return runner.prefill(ids, FullKV()).logits


def measure(engine: Engine, n: int, repeats: int) -> list[str]:
    """One table row: median seconds of both at n tokens, their ratio, and how far their logits differ."""
    ids = prompt_ids(engine.loaded.tokenizer, n, engine.loaded.device)  # [n]
    fns = {"hf": partial(hf_logits, engine.loaded.model, ids), "runner": partial(runner_logits, engine.runner, ids)}
    last: dict = {}
    seconds = medians(interleaved(fns, repeats, device_sync(engine.loaded.device), keep=last))
    ratio = seconds["runner"] / seconds["hf"]
    diff = (last["hf"] - last["runner"]).abs().max().item()
    verdict = "PASS" if ratio <= TARGET_RATIO else "MISS"
    return [str(n), cell(seconds["hf"], 3), cell(seconds["runner"], 3), cell(ratio, 3), f"{diff:.1e}", verdict]


def overhead_table(engine: Engine, lengths: list[int], repeats: int) -> Table:
    measure(engine, min(lengths[0], 128), 1)  # warm-up: thread pools, allocator, lazy inits
    table = Table(
        title=f"Runner fullkv prefill vs HF forward ({engine.loaded.name}, {engine.loaded.dtype})",
        headers=["tokens", "HF forward s", "runner s", "ratio", "max abs Δ logit", f"ratio ≤ {TARGET_RATIO}"],
        caption=(
            f"Target: runner / HF ratio ≤ {TARGET_RATIO}. Medians of {repeats} interleaved runs (HF, runner, HF, ...); "
            f"both compute only the last token's logits; the HF forward uses attn_implementation="
            f"{engine.loaded.config._attn_implementation}."
        ),
    )
    for n in lengths:
        table.rows.append(measure(engine, n, repeats))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS, help="prompt lengths in tokens")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="interleaved runs per length")
    parser.add_argument("--model", help="model to load (default: the embedded SmolLM2-135M)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    engine = Engine.load(args.model, args.device)
    if max(args.lengths) > engine.loaded.context_window:
        parser.error(
            f"--lengths go up to {max(args.lengths)}, past the model's window of {engine.loaded.context_window}"
        )
    table = overhead_table(engine, args.lengths, args.repeats)
    table.print()
    if not args.no_write:
        reduced = reduced_run(lengths=(args.lengths, DEFAULT_LENGTHS), repeats=(args.repeats, DEFAULT_REPEATS))
        raw = {"headers": table.headers, "rows": table.rows}
        path = write_section("overhead", "Runner overhead", table.markdown(), engine.loaded.device, reduced, raw=raw)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
