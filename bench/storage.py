"""Which storage keeps the default saved cache's answers: the query-aware cache stored in float16, and in
int4 with its paused hidden states at each width of --hidden-bits, on the docqa questions of one half.
`--added-bits` adds int4 storages whose keys and values have that many more bits in every layer than
int4's (hidden states at int4's width), `--int8` int8 storage and `--coded` coded storage (core/storage/coded.py): the
frontier between the file's size and `ask`'s answers.

python bench/storage.py [--hidden-bits 8 6 5 4] [--added-bits 1 2] [--int8] [--coded] [--half tuning|held-out]
                        [--documents PATH ...] [--limit N] [--model M] [--tag T] [--no-write] [--from-raw]

Each document is built once, paused at fastkv's TSP layer as `cache build` does, and each storage's tensors
go through the file's quantizer and back in memory (core.storage's cache_tensors and cache_from_tensors: what
`cache build` writes and `cache query` reads, without the disk). Per storage: answers equal to `ask`'s
(fastkv at its default budget), docqa score, mean KL(float16 || storage) of the first answer token, and the
stored tensors' bytes as a share of the float16 fullkv cache's, plotted against the answers kept, with the two
targets (`ask`'s answer on ≥ 90% of the questions, a file ≤ 20%). On `--half tuning` it prints the choice of a rule fixed before any run: the smallest storage that
keeps `ask`'s answer on at least 90% of the questions; report the choice's held-out numbers with
bench/accuracy.py. On the held-out half it chooses nothing and lists the storages that meet that target.
`--documents` asks only those documents' questions (paths as bench/tasks/docqa.jsonl names them). `--from-raw`
runs nothing: it renders the answers file a run with the same options wrote.
"""

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from answers.checks import SAVED_TARGETS
from answers.outcomes import kl_divergence
from answers.run import groups, run_ask
from answers.variants import Settings, Variant
from cache import TARGETS as CACHE_TARGETS
from common import Report, Table, link, reduced_run, tag, write_atomic, write_section
from matplotlib.figure import Figure
from rich.console import Console
from tasks import HALVES, docqa
from tasks.replay import question_ids
from tasks.scoring import score

from core.engine import Engine
from core.generation import Decoding
from core.methods import DEFAULT_METHOD, make_method
from core.options import BuildPlan
from core.saved import SavedContext, fullkv_file_bytes
from core.storage import Manifest, Quantization, cache_from_tensors, cache_tensors, quantization_for, tensors_sha256
from core.storage import Storage as FileStorage
from core.storage.quant import CODE_WIDTHS, HIDDEN_BITS

DEFAULT_HIDDEN_BITS = [8, 6, 5, 4]
FILE_TARGET = 100 * CACHE_TARGETS["size_share"]  # the file target, in % of the float16 fullkv file
MAX_NEW_TOKENS = 24


@dataclass(frozen=True)
class Storage:
    dtype: str
    hidden_bits: int | None = None  # a quantized dtype's width for the paused hidden states (None: the dtype's own)
    added_bits: int = 0  # bits added to every paused layer's keys and values, over the dtype's own widths

    @property
    def label(self) -> str:
        label = self.dtype if self.hidden_bits is None else f"{self.dtype}, hidden states at {self.hidden_bits} bits"
        plural = "s" if self.added_bits > 1 else ""
        return label + (f", keys and values +{self.added_bits} bit{plural} by layer" if self.added_bits else "")

    def quantization(self, manifest: Manifest) -> Quantization | None:
        scheme = quantization_for(self.dtype, manifest.model, manifest.paused_layer)
        if scheme is None:
            return None
        layer_bits = tuple(width + self.added_bits for width in scheme.layer_bits)
        return replace(scheme, hidden_bits=self.hidden_bits or scheme.hidden_bits, layer_bits=layer_bits)


def stored(engine: Engine, saved: SavedContext, storage: Storage) -> tuple[SavedContext, int]:
    """`saved` as a file in `storage` would give it back, and the bytes of that file's tensors."""
    quantization = storage.quantization(saved.manifest)
    tensors = cache_tensors(saved.cache, storage.dtype, quantization, engine.runner)
    manifest = replace(saved.manifest, storage=FileStorage(storage.dtype, quantization, tensors_sha256(tensors)))
    device, dtype = engine.loaded.device, engine.loaded.dtype
    cache = cache_from_tensors(tensors, manifest, device, dtype, engine.runner)
    return SavedContext(cache, manifest, saved.stats), sum(tensor.nbytes for tensor in tensors.values())


def questions(half: str, documents: list[str] | None = None) -> list:
    """The docqa items of one half, only those on `documents` if given."""
    return [item for item in docqa.items() if item.half == half and (not documents or item.group in documents)]


def run(engine: Engine, items: list, storages: list[Storage], decoding: Decoding, console: Console) -> list[dict]:
    """One record per question and storage; the first storage is the KL reference."""
    method = make_method(DEFAULT_METHOD)
    settings = Settings([Variant("ask", DEFAULT_METHOD, method.budget)], decoding, 1.0)
    records = []
    for group in groups(items):
        console.print(f"{group[0].group}: {len(group)} questions")
        asked = [run_ask(engine, item, settings, lambda: None)[1].text for item in group]
        reserved = max(len(question_ids(engine, item.question)) for item in group) + decoding.max_new_tokens
        saved = engine.build([group[0].document], BuildPlan(method, query_aware=True), reserved=reserved)
        context = saved.manifest.context_tokens
        fullkv = fullkv_file_bytes(saved.manifest.model, context)
        reference = {}
        for storage in storages:
            copy, nbytes = stored(engine, saved, storage)
            for item, ask_answer in zip(group, asked, strict=True):
                answered = engine.query(copy, item.question, decoding=decoding)
                answer, logits = answered.text, answered.logits
                reference.setdefault(item.question, logits)
                records.append({
                    "group": item.group, "question": item.question, "storage": storage.label,
                    "answer": answer, "ask_answer": ask_answer, "same_as_ask": answer == ask_answer,
                    "correct": score(item.task, answer, item.answers).correct,
                    "ask_correct": score(item.task, ask_answer, item.answers).correct,
                    "kl": kl_divergence(reference[item.question], logits),
                    "stored_bytes": nbytes, "fullkv_bytes": fullkv,
                })  # fmt: skip
    return records


@dataclass(frozen=True)
class Result:
    """One storage's records, summed."""

    storage: Storage
    questions: int
    same_as_ask: int
    correct: int
    mean_kl: float
    share: float  # stored bytes over the float16 fullkv cache's, over the documents, in %

    @classmethod
    def of(cls, records: list[dict], storage: Storage) -> "Result":
        mine = [r for r in records if r["storage"] == storage.label]
        documents = {r["group"]: r for r in mine}.values()  # sizes are per document
        share = 100 * sum(r["stored_bytes"] for r in documents) / sum(r["fullkv_bytes"] for r in documents)
        same, correct = sum(r["same_as_ask"] for r in mine), sum(r["correct"] for r in mine)
        return cls(storage, len(mine), same, correct, sum(r["kl"] for r in mine) / len(mine), share)

    @property
    def keeps_answers(self) -> bool:
        return 100 * self.same_as_ask / self.questions >= SAVED_TARGETS["same_as_ask"]


def table(results: list[Result], records: list[dict]) -> Table:
    rows = [
        [r.storage.label, f"{r.share:.1f}%", f"{r.same_as_ask}/{r.questions} ({100 * r.same_as_ask / r.questions:.0f}%)",
         f"{r.correct}/{r.questions}", f"{r.mean_kl:.4f}"]
        for r in results
    ]  # fmt: skip
    reference = results[0].storage.label
    asked = [r for r in records if r["storage"] == reference]
    caption = f"`ask` (fastkv, default budget) scores {sum(r['ask_correct'] for r in asked)}/{len(asked)}. "
    caption += f"KL against {reference} storage, which is the reference."
    headers = ["storage", "file (fullkv = 100%)", "same answer as ask", "score", "mean first-token KL"]
    return Table("Saved-cache storage against ask's answers", headers, rows, caption)


def choice(results: list[Result], half: str) -> str:
    """On the tuning half, the rule fixed before the run: the smallest storage keeping ask's answer on ≥ 90%
    of the questions. The held-out half reports which storages meet that target and chooses nothing."""
    kept = sorted((r for r in results if r.keeps_answers), key=lambda r: r.share)
    if half == "tuning":
        return f"smallest storage with ≥ 90% of ask's answers: {kept[0].storage.label if kept else 'none'}"
    meeting = "; ".join(r.storage.label for r in kept) or "none"
    return f"{half} half, nothing chosen from it; storages with ≥ 90% of ask's answers: {meeting}"


def plot(results: list[Result], title: str, path: Path) -> None:
    """Each storage's file share against the answers it keeps as `ask`'s, with the two targets."""
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    ax.axhline(
        SAVED_TARGETS["same_as_ask"],
        color="C3",
        lw=1,
        ls="--",
        label=f"target: ask's answer on ≥ {SAVED_TARGETS['same_as_ask']:g}%",
    )
    ax.axvline(FILE_TARGET, color="C2", lw=1, ls="--", label=f"target: file ≤ {FILE_TARGET:g}% of fullkv")
    for r in results:
        kept = 100 * r.same_as_ask / r.questions
        ax.plot(r.share, kept, "o", color="C0")
        ax.annotate(r.storage.label, (r.share, kept), fontsize=7, xytext=(4, -10), textcoords="offset points")
    (left, right), (bottom, top) = ax.get_xlim(), ax.get_ylim()
    ax.fill_between(
        [left, FILE_TARGET], SAVED_TARGETS["same_as_ask"], top, color="C2", alpha=0.1, label="both targets met"
    )
    ax.set(xlim=(left, right), ylim=(bottom, top))
    ax.set(xlabel="file, % of the float16 fullkv file", ylabel="same answer as ask, % of questions", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-bits", type=int, nargs="+", choices=CODE_WIDTHS, default=DEFAULT_HIDDEN_BITS)
    parser.add_argument("--added-bits", type=int, nargs="+", choices=range(1, 5), default=[])
    parser.add_argument("--int8", action="store_true", help="int8 storage too")
    parser.add_argument("--coded", action="store_true", help="coded storage too (cache build's default)")
    parser.add_argument("--tag", type=tag, help="suffix for the section, the plot and the answers file")
    parser.add_argument("--half", choices=HALVES, default="tuning", help="the fixed half of the questions")
    parser.add_argument("--documents", nargs="+", metavar="PATH", help="only these documents' questions")
    parser.add_argument("--limit", type=int, help="at most this many questions")
    parser.add_argument("--model", help="model to load (default: the embedded SmolLM2-135M)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-write", action="store_true", help="print only; write nothing under docs/")
    parser.add_argument("--from-raw", action="store_true", help="run nothing: render the answers file of this run")
    args = parser.parse_args(argv)
    engine = Engine.load(args.model, args.device)
    name = f"storage-{args.half}" + (f"-{args.tag}" if args.tag else "")
    title = f"Saved-cache storage, {args.half} half" + (f" ({args.tag})" if args.tag else "")
    report = Report.of(name, title, engine.loaded.spec)
    raw = report.plot.with_suffix(".json")
    storages = [Storage("float16")] + [Storage("int4", bits) for bits in args.hidden_bits]
    storages += [Storage("int4", HIDDEN_BITS, added) for added in args.added_bits] + [Storage("int8")] * args.int8
    storages += [Storage("coded")] * args.coded
    if args.from_raw:
        if not raw.exists():
            parser.error(f"--from-raw: {raw} does not exist; run without --from-raw first")
        records = json.loads(raw.read_text(encoding="utf-8"))
    else:
        items = questions(args.half, args.documents)
        unknown = set(args.documents or ()) - {item.group for item in items}
        if unknown:
            parser.error(f"--documents: no docqa questions on {', '.join(sorted(unknown))}")
        items = items[: args.limit]
        with torch.inference_mode():
            records = run(engine, items, storages, Decoding(max_new_tokens=MAX_NEW_TOKENS), Console(stderr=True))
    results = [Result.of(records, storage) for storage in storages]
    result, chosen = table(results, records), choice(results, args.half)
    result.print()
    print(chosen)
    if not args.no_write:
        if not args.from_raw:
            write_atomic(raw, json.dumps(records, indent=1) + "\n")
        plot(results, report.heading, report.plot)
        reduced = reduced_run(
            hidden_bits=(args.hidden_bits, DEFAULT_HIDDEN_BITS),
            documents=(args.documents or "all", "all"),
            limit=(args.limit, None),
        )
        body = f"{result.markdown()}\n{chosen}. Every answer: [{raw.name}]({link(raw)}).\n\n![Storage frontier]({link(report.plot)})"
        path = write_section(report.section, report.heading, body, engine.loaded.device, reduced)
        print(f"wrote {path}, {report.plot} and {raw}")


if __name__ == "__main__":
    main()
