"""Time per question against a saved cache: fresh `fastkv cache query` processes, the same command through a
running `fastkv serve`, and one in-process `cache query` reading the questions from stdin. The cache is what
a plain `fastkv cache build DOC -o FILE` writes (query-aware, coded storage), built once, untimed.

python bench/serve.py [--tokens 7500] [--questions 5] [--repeats 3] [--max-new-tokens 1] [--threads N] [--no-write]
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from cache import write_document
from common import Table, cell, interleaved, medians, reduced_run, write_section

from core.engine import Engine

DEFAULT_TOKENS = 7500
DEFAULT_QUESTIONS = 5
DEFAULT_REPEATS = 3
TARGET_SHARE = 0.1  # through a server, a fresh client answers in at most a tenth of a fresh process's time
QUESTIONS = [
    "How long does a licensee have to cure a violation after being notified?",
    "What does the license say about patents?",
    "Who may distribute copies of the program?",
    "What is the corresponding source of a work?",
    "Is there any warranty for the program?",
    "What must a conveyed modified version carry?",
    "When does the license terminate?",
    "What is an aggregate?",
]
CLIENT_MODULES = ("fastkv_cli.app", "fastkv_cli.client")


def fastkv(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastkv_cli", *args]


def environment(threads: int | None) -> dict:
    """Every timed process alike: torch's own thread count, or --threads (OMP_NUM_THREADS)."""
    return os.environ if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}


def run(command: list[str], env: dict, stdin: str | None = None) -> None:
    subprocess.run(command, input=stdin, text=True, check=True, capture_output=True, env=env)


def build_default_cache(document: Path, path: Path, env: dict) -> None:
    """The cache a user gets from `fastkv cache build DOC -o FILE` with no other option."""
    run(fastkv("cache", "build", str(document), "-o", str(path), "--quiet"), env)


def start_server(folder: Path, env: dict) -> tuple[subprocess.Popen, str]:
    """`fastkv serve` on a free port over `folder`, once it listens -> (process, URL)."""
    log = folder / "serve.log"
    command = fastkv("serve", "--port", "0", "--allow-dir", str(folder), "--quiet")
    with log.open("wb") as out:
        process = subprocess.Popen(command, stderr=out, env=env)
    while process.poll() is None:
        if match := re.search(r"listening on (http://\S+)", log.read_text()):
            return process, match[1]
        time.sleep(0.1)
    raise RuntimeError(f"fastkv serve did not start:\n{log.read_text()}")


def client_import_ms() -> float:
    """Cumulative import time of what a client process imports for the CLI (python -X importtime)."""
    code = f"import {', '.join(CLIENT_MODULES)}"
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True)
    cumulative = {
        parts[2].strip(): int(parts[1])
        for line in done.stderr.splitlines()
        if (parts := line.removeprefix("import time:").split("|"))[1].strip().isdigit()
    }
    return sum(cumulative.get(name, 0) for name in CLIENT_MODULES) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="document length in tokens")
    parser.add_argument(
        "--questions", type=int, default=DEFAULT_QUESTIONS, help=f"questions per run (≤ {len(QUESTIONS)})"
    )
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="interleaved rounds")
    parser.add_argument("--max-new-tokens", type=int, default=1, help="answer length (1: time to first token)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every process (default: torch's choice)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    questions = QUESTIONS[: args.questions]
    engine = Engine.load()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "document.fkv"
        document = write_document(engine, args.tokens, folder)
        model_name = engine.loaded.name
        del engine  # the benchmark's own copy of the model would only crowd the processes it times
        env = environment(args.threads)
        build_default_cache(document, path, env)
        server, url = start_server(folder, env)
        try:
            query = ["cache", "query", str(path), "--max-new-tokens", str(args.max_new_tokens), "--json", "--quiet"]
            each = {
                "fresh process": lambda: [run(fastkv(*query[:3], q, *query[3:]), env) for q in questions],
                "through the server": lambda: [run(fastkv(*query[:3], q, *query[3:], "--server", url), env) for q in questions],
                "one process, stdin": partial(run, fastkv(*query), env, "\n".join(questions) + "\n"),
            }  # fmt: skip
            seconds = {name: total / len(questions) for name, total in medians(interleaved(each, args.repeats)).items()}
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait()
    import_ms = client_import_ms()
    load_after = os.getloadavg()[0]
    fresh = seconds["fresh process"]
    table = Table(
        title=f"Time per question from the default saved cache ({model_name}, `cache build` at {args.tokens} tokens, "
        f"{len(questions)} questions, --max-new-tokens {args.max_new_tokens})",
        headers=["how", "s / question", "share of a fresh process"],
    )
    commands = {
        "fresh process": "`fastkv cache query FILE Q` per question",
        "through the server": "`fastkv cache query FILE Q --server URL` per question (a fresh client process)",
        "one process, stdin": "`fastkv cache query FILE < questions` (one process; its start shared by all)",
    }
    for name, text in commands.items():
        table.rows.append([text, cell(seconds[name], 3), cell(100 * seconds[name] / fresh, 1, "%")])
    share = seconds["through the server"] / fresh
    verdict = f"{'PASS' if share <= TARGET_SHARE else 'MISS'} through a server, a fresh client answers in ≤ 10% of a fresh process's time (measured {100 * share:.1f}%)"
    table.caption = (
        f"Wall time of whole client processes (`python -m fastkv_cli`), per question: medians of {args.repeats} "
        f"interleaved rounds (fresh, server, stdin, ...), each round answering every question. The server "
        f"(`fastkv serve`, started once, the model loaded) keeps the cache loaded between questions. The client "
        f"imports {' + '.join(CLIENT_MODULES)} in {import_ms:.0f} ms (python -X importtime) and no torch. "
        f"Torch threads: {'torch default' if args.threads is None else f'{args.threads} (OMP_NUM_THREADS) in every process'}. "
        f"1-minute load average {load_before:.1f} before and {load_after:.1f} after on {os.cpu_count()} cores"
        + (": measured under load from other processes." if max(load_before, load_after) > 1.5 else ".")
    )
    table.print()
    print(verdict)
    if not args.no_write:
        reduced = reduced_run(
            tokens=(args.tokens, DEFAULT_TOKENS),
            questions=(args.questions, DEFAULT_QUESTIONS),
            repeats=(args.repeats, DEFAULT_REPEATS),
            max_new_tokens=(args.max_new_tokens, 1),
        )
        body = "\n".join([table.markdown(), f"- {verdict}", ""])
        raw = {
            "seconds_per_question": seconds,
            "tokens": args.tokens,
            "questions": questions,
            "client_import_ms": import_ms,
        }
        path = write_section("serve", "Server: time per question", body, torch.device("cpu"), reduced, raw=raw)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
