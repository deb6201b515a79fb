"""One question over many documents: a shell loop of `fastkv ask`, `--each`, and `--each --ray` (2 workers).

The same N documents of about 2K tokens each (slices of the shipped texts) and the same question, greedy;
the answers must be the same in all three. Prints documents per minute and total time and writes the
`corpus` section of docs/benchmarks.md.

    python bench/corpus.py                 # 16 documents, the embedded model
    python bench/corpus.py --docs 4        # a smoke run
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import real_text, write_section  # noqa: E402

QUESTION = "What does this text say about permission to copy or modify it?"
CHARS_PER_DOC = 8000  # about 2K tokens of English with the embedded tokenizer
MAX_NEW = 16


def fastkv(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "fastkv_cli", *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"fastkv {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done


def answers(stdout: str) -> dict[str, str]:
    return {r["documents"][0]["name"]: r["answer"] for r in map(json.loads, stdout.splitlines())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--model", default=None)
    settings = parser.parse_args()
    text = real_text()
    text *= -(-settings.docs * CHARS_PER_DOC // len(text))  # repeated where the documents need more than it has
    common = ["--json", "--quiet", "--max-new-tokens", str(MAX_NEW)] + (
        ["--model", settings.model] if settings.model else []
    )
    with tempfile.TemporaryDirectory() as folder:
        names = []
        for i in range(settings.docs):
            path = Path(folder) / f"doc{i:02d}.txt"
            path.write_text(text[i * CHARS_PER_DOC : (i + 1) * CHARS_PER_DOC])
            names.append(str(path))
        runs = {}
        start = time.perf_counter()
        loop = {}
        for name in names:  # what a shell loop does: one process (and model load) per document
            loop |= answers(fastkv("ask", name, QUESTION, *common).stdout)
        runs["shell loop of `fastkv ask`"] = (time.perf_counter() - start, loop)
        start = time.perf_counter()
        each = answers(fastkv("ask", *names, QUESTION, *common, "--each").stdout)
        runs["`fastkv ask --each`"] = (time.perf_counter() - start, each)
        start = time.perf_counter()
        ray = answers(fastkv("ask", *names, QUESTION, *common, "--each", "--ray", "--ray-workers", "2").stdout)
        runs["`--each --ray` (local runtime, 2 workers)"] = (time.perf_counter() - start, ray)
    baseline_s, baseline = runs["shell loop of `fastkv ask`"]
    rows = ["| run | total s | documents / min | × shell loop | same answers |", "| --- | ---: | ---: | ---: | --- |"]
    for label, (seconds, got) in runs.items():
        same = "yes" if got == baseline else f"{sum(got.get(k) == v for k, v in baseline.items())}/{len(baseline)}"
        rows.append(
            f"| {label} | {seconds:.1f} | {60 * len(names) / seconds:.1f} | {baseline_s / seconds:.2f} | {same} |"
        )
    body = "\n".join(rows) + (
        f"\n\n{len(names)} documents of {CHARS_PER_DOC:,} characters (about 2K tokens), one question, greedy, "
        f"at most {MAX_NEW} new tokens; wall time of each whole run, model loads and Ray start-up included."
    )
    print(body)
    raw = {label: {"seconds": seconds, "answers": got} for label, (seconds, got) in runs.items()}
    heading = "Many documents: shell loop, --each, --each --ray"
    write_section("corpus", heading, body, torch.device("cpu"), None, raw=raw)


if __name__ == "__main__":
    main()
