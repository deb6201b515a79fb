"""Prefill speed on CUDA at 8K-128K tokens: fullkv, fastkv and snapkv against the HF forward, Llama-3.1-8B's shape.

The model has random bf16 weights, built directly on the GPU (no download, no CPU copy); prefill cost
depends on the shapes, not on the weights' values, and the token ids are random too.
`--smoke` runs the same code on CPU with a tiny Llama in seconds, so a test keeps this script working.

python bench/gpu.py [--lengths 8192 32768 65536 131072] [--repeats 2] [--warmup 1] [--no-write]
python bench/gpu.py --smoke [--write]
"""

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial

import torch
from common import Table, cell, device_sync, hf_logits, interleaved, medians, reduced_run, write_section
from transformers import AutoModelForCausalLM, LlamaConfig

from core.methods import Method, make_method
from core.runner import Runner

LLAMA_31_8B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
    max_position_embeddings=131072,
)
TINY_LLAMA = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=512,
    max_position_embeddings=131072,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
FULL_LENGTHS = [8192, 32768, 65536, 131072]
FULL_REPEATS = 2
SMOKE_LENGTHS = [64, 128]
METHODS = ("fullkv", "fastkv", "snapkv")
HF = "HF forward"
OOM = "OOM"


def build_model(shape: dict, device: torch.device, dtype: torch.dtype):
    """A random-weight Llama with llama3 RoPE scaling, allocated on `device` from the start."""
    config = LlamaConfig(**shape, rope_parameters=LLAMA3_ROPE)
    torch.manual_seed(0)
    with device:
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def guarded(name: str, fn: Callable[[], object], failed: set[str]) -> Callable[[], None]:
    """fn, except that running out of GPU memory marks `name` as failed and skips it from then on."""

    def run() -> None:
        if name in failed:
            return
        try:
            fn()
        except torch.OutOfMemoryError:
            failed.add(name)
        if name in failed:  # outside the except block, whose traceback still holds the tensors
            torch.cuda.empty_cache()

    return run


def runner_first_token(runner: Runner, ids, method: Method) -> int:
    return int(runner.prefill(ids, method).logits.argmax())


def prefill_fns(model, runner: Runner, ids, budget: str, failed: set[str]) -> dict[str, Callable[[], None]]:
    fns = {HF: partial(hf_logits, model, ids)}
    for name in METHODS:
        method = make_method(name) if name == "fullkv" else make_method(name, budget=budget)
        fns[name] = partial(runner_first_token, runner, ids, method)
    return {name: guarded(name, fn, failed) for name, fn in fns.items()}


def measure(model, runner: Runner, n: int, args, failed: set[str]) -> dict[str, float | None]:
    """Median seconds of each prefill at n random tokens; None where it ran out of memory (now or shorter)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(n)
    ids = torch.randint(model.config.vocab_size, (n,), generator=generator, device=device)  # [n]
    fns = prefill_fns(model, runner, ids, args.budget, failed)
    sync = device_sync(device)
    interleaved(fns, args.warmup, sync)
    seconds = medians(interleaved(fns, args.repeats, sync))
    return {name: None if name in failed else s for name, s in seconds.items()}


def rows(n: int, seconds: dict[str, float | None]) -> list[list[str]]:
    def speedup(base: str, name: str) -> str:
        if seconds[base] is None or seconds[name] is None:
            return "—"
        return cell(seconds[base] / seconds[name])

    return [
        [str(n), name, OOM if s is None else cell(s, 3), speedup(HF, name), speedup("fullkv", name)]
        for name, s in seconds.items()
    ]


def device_and_shape(args) -> tuple[torch.device, torch.dtype, dict, str]:
    """Where and what to run, and a title naming the card and the model."""
    if args.smoke:
        return torch.device("cpu"), torch.float32, TINY_LLAMA, "Prefill on CPU: a tiny Llama (--smoke)"
    device = torch.device("cuda")
    return device, torch.bfloat16, LLAMA_31_8B, f"Prefill on {torch.cuda.get_device_name(device)}: Llama-3.1-8B shape"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny Llama on CPU, short lengths, 1 repeat, no warm-up")
    parser.add_argument(
        "--lengths", type=int, nargs="+", help=f"tokens (default {FULL_LENGTHS}; smoke {SMOKE_LENGTHS})"
    )
    parser.add_argument("--repeats", type=int, help=f"interleaved runs per length (default {FULL_REPEATS}; smoke 1)")
    parser.add_argument("--warmup", type=int, help="untimed rounds per length (default 1; smoke 0)")
    parser.add_argument("--budget", default="10%", help="KV budget of fastkv and snapkv (10%% or 1024)")
    parser.add_argument(
        "--write", action=argparse.BooleanOptionalAction, help="update docs/benchmarks.md (default: yes, smoke: no)"
    )
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device here; `--smoke` runs a tiny model on CPU")
    args.lengths = args.lengths or (SMOKE_LENGTHS if args.smoke else FULL_LENGTHS)
    args.repeats = args.repeats or (1 if args.smoke else FULL_REPEATS)
    args.warmup = (0 if args.smoke else 1) if args.warmup is None else args.warmup
    args.write = not args.smoke if args.write is None else args.write
    return args


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    device, dtype, shape, title = device_and_shape(args)
    model = build_model(shape, device, dtype)
    runner, failed = Runner(model), set()
    table = Table(
        title=f"{title}, random weights, {dtype}",
        headers=["tokens", "method", "prefill s", "× HF", "× fullkv"],
        text_columns=2,
    )
    for n in args.lengths:
        seconds = measure(model, runner, n, args, failed)
        table.rows += rows(n, seconds)
        done = ", ".join(f"{name} {OOM if s is None else f'{s:.3f} s'}" for name, s in seconds.items())
        print(f"{n} tokens: {done}", file=sys.stderr, flush=True)  # a run cut short still leaves its numbers
    table.caption = (
        f"Prefill + first token, median of {args.repeats} interleaved runs after {args.warmup} warm-up round(s); "
        f"× columns are speedups (higher is faster); fastkv/snapkv budget {args.budget}. "
        f"{OOM}: out of GPU memory (longer lengths skip it too). Whole run: {time.perf_counter() - start:.0f} s."
    )
    table.print()
    if args.write:
        full = dict(lengths=(args.lengths, FULL_LENGTHS), repeats=(args.repeats, FULL_REPEATS))
        reduced = "CPU run of a tiny Llama (--smoke)" if args.smoke else reduced_run(**full)
        heading = "Prefill on a GPU at 8K-128K tokens"
        raw = {"headers": table.headers, "rows": table.rows}
        path = write_section("gpu", heading, table.markdown(), device, reduced, smoke=args.smoke, raw=raw)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
