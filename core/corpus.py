"""Many documents (or caches), one run each: the items, what to do with each, and the local loop; results and
failures per item.

The per-item function (`run_item`) is the same wherever it runs: the local loop calls it with the
process's engine, and each Ray worker (core/cluster.py) calls it with its own engine, loaded once.
"""

import hashlib
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from core.atomic import temp_files
from core.documents import STDIN_PATH, Document, read_document_data, read_documents
from core.errors import FastKVError, InputError
from core.generation import Decoding
from core.methods import Budget, Method
from core.options import BuildPlan
from core.progress import Progress, no_progress

CACHE_SUFFIX = ".fkv"
TextCallback = Callable[[str], None]


@dataclass(frozen=True)
class Item:
    """One document (ask, build) or cache file (query) of a corpus run."""

    index: int  # its place in the command line: results are reported under it
    name: str  # the path as given (a document's name is part of its prompt) or "-"
    data: bytes | None = None  # the bytes, read by the driver for a remote worker; None: read `name` where it runs
    target: str | None = None  # build: the .fkv file to write; query: the cache's absolute path (for a worker)
    attempt: int = 0  # how many workers died running it


@dataclass
class Outcome:
    """What one item gave: its records (JSON-ready answers, or a build summary) or its error."""

    index: int
    name: str
    records: list[dict] = field(default_factory=list)
    error: str | None = None
    exit_code: int = 0
    seconds: float = 0.0
    skipped: bool = False  # build: the cache was already up to date
    worker: int = 0  # the process that ran it

    @property
    def failed(self) -> bool:
        return self.error is not None


# --- what to do with each item -------------------------------------------------------------------------


@dataclass(frozen=True)
class AskTask:
    """`fastkv ask --each`: the question over each document alone."""

    question: str
    method: Method
    decoding: Decoding = Decoding()
    truncate: str | None = None
    ignore_memory: bool = False

    def run(self, engine, item: Item, on_text: TextCallback, progress: Progress) -> tuple[list[dict], bool]:
        limit = engine.ask_limit(self.question, self.decoding.max_new_tokens, self.truncate)
        start = time.perf_counter()
        document = read_item(item, limit)
        read_s = time.perf_counter() - start
        answer = engine.ask(
            [document], self.question, self.method, self.decoding, self.truncate, on_text, progress,
            ignore_memory=self.ignore_memory,
        )  # fmt: skip
        answer.stats.read_s = read_s
        return [answer.to_dict()], False


@dataclass(frozen=True)
class BuildTask:
    """`fastkv cache build --each -o DIR`: one cache file per document; an up-to-date one is kept unless `force`."""

    plan: BuildPlan
    force: bool = False

    def run(self, engine, item: Item, on_text: TextCallback, progress: Progress) -> tuple[list[dict], bool]:
        start = time.perf_counter()
        document = read_item(item, engine.build_limit(self.plan.truncate))
        read_s = time.perf_counter() - start
        target = Path(item.target)
        if not self.force and engine.is_built(target, [document], self.plan):
            return [{"document": item.name, "output": str(target), "skipped": True}], True
        built = engine.build_file([document], target, self.plan, overwrite=True, progress=progress)
        built.saved.stats.read_s = read_s
        summary = {"document": item.name, "output": str(target), "skipped": False, "file_bytes": built.file_bytes}
        return [{**summary, "save_s": built.save_s, **built.saved.stats.to_dict()}], False


@dataclass(frozen=True)
class QueryTask:
    """`fastkv cache ask CACHE... QUESTION`: each question over each saved cache."""

    questions: tuple[str, ...]
    budget: Budget | None = None
    decoding: Decoding = Decoding()

    def run(self, engine, item: Item, on_text: TextCallback, progress: Progress) -> tuple[list[dict], bool]:
        saved = engine.load_saved(Path(item.target or item.name))
        records = []
        for question in self.questions:
            answer = engine.query(saved, question, self.budget, self.decoding, on_text)
            records.append({"cache": item.name, **answer.to_dict()})
        return records, False


Task = AskTask | BuildTask | QueryTask


def read_item(item: Item, limit) -> Document:
    """The item's document: from the bytes the driver sent, else read from its path here."""
    if item.data is not None:
        return read_document_data(item.name, item.data, limit=limit)
    return read_documents([item.name], limit=limit)[0]


def run_item(
    engine, task: Task, item: Item, on_text: TextCallback = lambda text: None, progress: Progress = no_progress
) -> Outcome:
    """Run `task` on one item -> its Outcome; a failure is the item's, reported, never raised (Ctrl-C is)."""
    start = time.perf_counter()
    outcome = Outcome(item.index, item.name, worker=os.getpid())
    try:
        outcome.records, outcome.skipped = task.run(engine, item, on_text, progress)
    except FastKVError as error:
        outcome.error, outcome.exit_code = str(error), error.exit_code
    except (RuntimeError, ValueError, OSError, MemoryError) as error:  # e.g. out of device memory: this item only
        outcome.error, outcome.exit_code = f"{type(error).__name__}: {error}", 1
    outcome.seconds = time.perf_counter() - start
    return outcome


# --- the items -----------------------------------------------------------------------------------------


def cache_targets(paths: list[str], directory: Path) -> list[Path]:
    """One .fkv path in `directory` per document, named after it (`notes.txt` -> `notes.fkv`).

    Documents whose names collide (`a/notes.txt`, `b/notes.md`) each get a short hash of their
    absolute path (`notes-1a2b3c4d.fkv`): the same name in every run with the same documents,
    whatever their order, so a rerun finds what an interrupted one built.
    """
    stems = [stem_of(path) for path in paths]
    targets = []
    for path, stem in zip(paths, stems, strict=True):
        if stems.count(stem) > 1:
            where = "<stdin>" if path == STDIN_PATH else os.path.abspath(path)
            stem = f"{stem}-{hashlib.sha256(where.encode()).hexdigest()[:8]}"
        targets.append(directory / f"{stem}{CACHE_SUFFIX}")
    return targets


def stem_of(path: str) -> str:
    if path == STDIN_PATH:
        return "stdin"
    stem = Path(path).stem
    return stem if stem and not stem.startswith(".") else f"_{stem.lstrip('.') or 'document'}"


def cache_files(paths: list[str]) -> list[str]:
    """The .fkv files named, directories standing for the .fkv files in them (sorted by name)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(str(p) for p in Path(path).iterdir() if p.suffix == CACHE_SUFFIX and p.is_file())
            if not found:
                raise InputError(f"{path}: no {CACHE_SUFFIX} files in this directory")
            files.extend(found)
        else:
            files.append(path)
    return files


def remove_partial(task: Task, item: Item) -> None:
    """What an interrupted write of the item's cache left (a temp file beside its target)."""
    if isinstance(task, BuildTask) and item.target is not None:
        for path in temp_files(Path(item.target)):
            path.unlink(missing_ok=True)


# --- running them here ---------------------------------------------------------------------------------


def run_local(
    engine,
    task: Task,
    items: Iterable[Item],
    on_outcome: Callable[[Outcome], None],
    on_start: Callable[[Item], None] = lambda item: None,
    on_text: TextCallback = lambda text: None,
    progress: Progress = no_progress,
) -> None:
    """One item after another in this process, with its loaded engine."""
    for item in items:
        on_start(item)
        on_outcome(run_item(engine, task, item, on_text, progress))
