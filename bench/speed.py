"""Prefill (time to first token), decode speed, KV cache size and prefill memory of every method, on real text.

python bench/speed.py [--lengths 2048 4096 7680] [--repeats 3] [--budget 10%] [--methods ...] [--model M]
    [--no-write]

Another --model gets its own section of docs/benchmarks.md and its own plot (docs/results/), beside the embedded model's.
"""

import argparse
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from common import (
    MIB,
    PeakMemory,
    Report,
    Table,
    cell,
    device_sync,
    hf_logits,
    interleaved,
    link,
    medians,
    prompt_ids,
    reduced_run,
    tag,
    write_section,
)
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

from core.engine import Engine
from core.generation import generate
from core.methods import Method, make_method
from core.runner import Prefill, Runner

DEFAULT_LENGTHS = [2048, 4096, 7680]
DEFAULT_REPEATS = 3
METHODS = ("fastkv", "fullkv", "snapkv", "streamingllm", "gemfilter")
NEEDED = ("fastkv", "fullkv")  # every speedup and target is measured against them
HF = "HF forward"


@dataclass
class LengthResult:
    """Everything measured at one prompt length; keys are method names and HF."""

    tokens: int
    ttft_s: dict[str, float]  # medians
    extra_mib: dict[str, float | None]  # prefill memory above what was resident before it
    decode_tps: dict[str, float] = field(default_factory=dict)  # decode tokens per second, medians
    kv_bytes: dict[str, int] = field(default_factory=dict)


def make_methods(names: list[str], budget: str) -> dict[str, Method]:
    """The methods asked for, in METHODS order, always with fastkv and fullkv."""
    chosen = [name for name in METHODS if name in names or name in NEEDED]
    return {name: make_method(name) if name == "fullkv" else make_method(name, budget=budget) for name in chosen}


def hf_first_token(model, ids, meter: PeakMemory) -> tuple[int, float | None]:
    return int(hf_logits(model, ids).argmax()), meter.extra_mib()


def runner_first_token(runner: Runner, ids, method: Method, meter: PeakMemory) -> tuple[Prefill, float | None]:
    prefill = runner.prefill(ids, method)
    int(prefill.logits.argmax())  # the first token, as a user would wait for it
    return prefill, meter.extra_mib()


def decode(runner: Runner, prefill: Prefill, steps: int) -> None:
    """`steps` decode forward passes after the first token; the prefill's cache is left as it was."""
    cache = prefill.cache.clone()  # decoding appends in place
    generate(runner, cache, prefill.logits, steps + 1, stop_ids=set())


def measure(engine: Engine, n: int, methods: dict[str, Method], repeats: int, steps: int) -> LengthResult:
    """Interleaved TTFT of HF and every method, then interleaved decode from each method's cache."""
    device, runner = engine.loaded.device, engine.runner
    ids = prompt_ids(engine.loaded.tokenizer, n, device)  # [n]
    meter, sync, last = PeakMemory(device), device_sync(device), {}
    fns = {HF: partial(hf_first_token, engine.loaded.model, ids, meter)}
    fns |= {name: partial(runner_first_token, runner, ids, method, meter) for name, method in methods.items()}
    ttft = medians(interleaved(fns, repeats, sync, keep=last, before=meter.reset))
    result = LengthResult(n, ttft, {name: extra for name, (_, extra) in last.items()})
    prefills = {name: last[name][0] for name in methods}
    last.clear()
    decode_fns = {name: partial(decode, runner, prefill, steps) for name, prefill in prefills.items()}
    result.decode_tps = {name: steps / s for name, s in medians(interleaved(decode_fns, repeats, sync)).items()}
    result.kv_bytes = {name: prefill.cache.nbytes for name, prefill in prefills.items()}
    return result


def warm_up(engine: Engine, methods: dict[str, Method]) -> None:
    """One short pass of everything, so thread pools and lazy initialisation do not land in the first timing."""
    measure(engine, 128, methods, repeats=1, steps=2)


def row(r: LengthResult, name: str) -> list[str]:
    """One table row; the HF forward has no cache of ours, so no decode or KV cells."""
    ttft = r.ttft_s
    speed = [cell(ttft[name], 3), cell(ttft[HF] / ttft[name]), cell(ttft["fullkv"] / ttft[name])]
    if name == HF:
        cache = ["—", "—", "—"]
    else:
        kv = r.kv_bytes[name]
        cache = [cell(r.decode_tps[name], 1), cell(kv / MIB, 1), cell(100 * kv / r.kv_bytes["fullkv"], 1, "%")]
    return [str(r.tokens), name, *speed, *cache, cell(r.extra_mib[name], 0)]


# fastkv's prefill speed-up over fullkv: the paper's regime at a 10% budget (DESIGN.md), and the
# default budget's targets at 8K and 16K tokens; other budgets have no target.
PREFILL_TARGETS = {"10%": {None: 1.6}, "30%,2048": {8192: 1.3, 16384: 1.5}}


def checks(r: LengthResult, budget: str, last: bool) -> list[str]:
    """The targets that apply at this length and budget: a 'PASS|MISS target (measured)' line each."""
    ttft, tps = r.ttft_s, r.decode_tps
    fast_vs_hf, fast_vs_full = ttft[HF] / ttft["fastkv"], ttft["fullkv"] / ttft["fastkv"]
    decode_vs_full = tps["fastkv"] / tps["fullkv"]
    kv_share = r.kv_bytes["fastkv"] / r.kv_bytes["fullkv"]
    targets = PREFILL_TARGETS.get(budget, {})
    prefill = targets.get(r.tokens, targets.get(None) if last else None)
    results = []
    if budget == "10%" and last:
        results += [("fastkv prefill ≥ 1.6× faster than the HF forward", fast_vs_hf, fast_vs_hf >= 1.6)]
    if prefill is not None:
        results += [(f"fastkv prefill ≥ {prefill}× faster than fullkv", fast_vs_full, fast_vs_full >= prefill)]
    if last:
        results += [("fastkv decode tok/s ≥ fullkv's", decode_vs_full, decode_vs_full >= 1)]
    if budget == "10%" and last:
        results += [("fastkv KV bytes ≤ 10.5% of fullkv's", kv_share, kv_share <= 0.105)]
    if "snapkv" in ttft and last:
        snap_vs_full = ttft["snapkv"] / ttft["fullkv"]
        results.insert(1, ("snapkv prefill time within 5% of fullkv's", snap_vs_full, abs(snap_vs_full - 1) <= 0.05))
    return [
        f"{'PASS' if ok else 'MISS'} {target} at {r.tokens} tokens (measured ratio {value:.3f})"
        for target, value, ok in results
    ]


def plot(results: list[LengthResult], title: str, path: Path) -> None:
    """Prefill seconds against context length, one line per method and a dashed one for the HF forward."""
    lengths = [r.tokens for r in results]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.plot(lengths, [r.ttft_s[HF] for r in results], "k--o", label=HF)
    for name in [name for name in METHODS if name in results[0].ttft_s]:
        ax.plot(lengths, [r.ttft_s[name] for r in results], "-o", label=name)
    ax.set(xlabel="context tokens", ylabel="time to first token (s, median)", title=title, xticks=lengths)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def speed_table(engine: Engine, results: list[LengthResult], args, idle_mib: float | None) -> Table:
    table = Table(
        title=f"Speed of each method ({engine.loaded.name}, {engine.loaded.dtype}, budget {args.budget})",
        headers=["tokens", "method", "TTFT s", "× HF", "× fullkv", "decode tok/s", "KV MiB", "KV % full", "+RSS MiB"],
        text_columns=2,
    )
    table.rows = [row(r, name) for r in results for name in r.ttft_s]
    table.caption = (
        f"TTFT: prefill + first token, median of {args.repeats} interleaved runs (HF, then each method, repeated); "
        f"× columns are speedups (higher is faster). Decode: {args.decode_tokens} greedy steps from each method's "
        f"cache, medians of {args.repeats} interleaved runs. +RSS: memory the prefill needed above what was resident "
        f"(the loaded model idles at {cell(idle_mib, 0)} MiB)."
    )
    return table


def section_body(table: Table, verdicts: list[str], plot_path: Path) -> str:
    targets = ["Targets:", "", *[f"- {verdict}" for verdict in verdicts]]
    plot_link = f"![Prefill seconds against context length per method]({link(plot_path)})"
    return "\n".join([table.markdown(), *targets, "", plot_link, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS, help="prompt lengths in tokens")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="interleaved runs per length")
    parser.add_argument("--budget", default="10%", help="KV budget of the compressing methods (10%% or 1024)")
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="fastkv and fullkv are always measured"
    )
    parser.add_argument("--decode-tokens", type=int, default=64, help="decode steps timed per method")
    parser.add_argument("--model", help="model to load (default: the embedded SmolLM2-135M)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--tag", type=tag, help="write a focused run (e.g. another budget) to its own section and plot")
    parser.add_argument("--no-write", action="store_true", help="print only; write nothing under docs/")
    args = parser.parse_args()
    engine = Engine.load(args.model, args.device)
    if max(args.lengths) > engine.loaded.context_window:
        parser.error(
            f"--lengths go up to {max(args.lengths)}, past the model's window of {engine.loaded.context_window}"
        )
    methods = make_methods(args.methods, args.budget)
    idle_mib = PeakMemory(engine.loaded.device).resident_mib()
    warm_up(engine, methods)
    results = [measure(engine, n, methods, args.repeats, args.decode_tokens) for n in args.lengths]
    table = speed_table(engine, results, args, idle_mib)
    table.print()
    verdicts = [v for r in results for v in checks(r, args.budget, last=r is results[-1])]
    print("Targets:", *verdicts, sep="\n  ")
    if not args.no_write:
        suffix = f"-{args.tag}" if args.tag else ""
        heading = "Speed, KV size and memory per method" + (f" ({args.tag})" if args.tag else "")
        report = Report.of("speed" + suffix, heading, engine.loaded.spec)
        plot(results, f"Prefill time, {engine.loaded.name}", report.plot)
        body = section_body(table, verdicts, report.plot)
        reduced = reduced_run(
            lengths=(args.lengths, DEFAULT_LENGTHS),
            repeats=(args.repeats, DEFAULT_REPEATS),
            methods=(sorted(methods), sorted(METHODS)),
        )
        raw = [asdict(result) for result in results]
        path = write_section(report.section, report.heading, body, engine.loaded.device, reduced, raw=raw)
        print(f"wrote {path} and {report.plot}")


if __name__ == "__main__":
    main()
