"""Many documents (or caches), one run each, here or on a Ray cluster: results and failures per item.

The per-item function (`run_item`) is the same wherever it runs: the local loop calls it with the
process's engine, and each Ray worker calls it with its own engine, loaded once (DESIGN.md §11).
This is the only module that imports ray, and only when a run asks for it.
"""

import hashlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from core.atomic import temp_files
from core.documents import STDIN_PATH, Document, read_document_data, read_documents
from core.errors import FastKVError, InputError
from core.generation import Decoding
from core.methods import Budget, Method
from core.progress import Progress, no_progress

CACHE_SUFFIX = ".fkv"
WORKER_ATTEMPTS = 3  # runs of one item on workers that died under it before it is reported as failed
STOP_WAIT_S = 10.0  # an interrupted run waits this long for its killed workers to be gone
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
    """`fastkv cache build --each -o DIR`: one cache file per document; an up-to-date one is kept."""

    method: Method
    query_budget: Budget | None
    questions: tuple[str, ...]
    truncate: str | None
    cache_dtype: str
    ignore_memory: bool
    query_aware: bool
    force: bool

    def run(self, engine, item: Item, on_text: TextCallback, progress: Progress) -> tuple[list[dict], bool]:
        from core.store import save_cache

        start = time.perf_counter()
        document = read_item(item, engine.build_limit(self.truncate))
        read_s = time.perf_counter() - start
        target = Path(item.target)
        if not self.force and self.up_to_date(engine, target, document):
            return [{"document": item.name, "output": str(target), "skipped": True}], True
        saved = engine.build(
            [document], self.method, self.query_budget, list(self.questions), self.truncate, progress=progress,
            cache_dtype=self.cache_dtype, ignore_memory=self.ignore_memory, query_aware=self.query_aware,
        )  # fmt: skip
        start = time.perf_counter()
        size = save_cache(target, saved.cache, saved.manifest, self.cache_dtype, True, engine.runner)
        saved.stats.read_s = read_s
        summary = {"document": item.name, "output": str(target), "skipped": False, "file_bytes": size}
        return [{**summary, "save_s": time.perf_counter() - start, **saved.stats.to_dict()}], False

    def up_to_date(self, engine, target: Path, document: Document) -> bool:
        """Whether `target` is a valid cache of this document's bytes, built with this model, tokenizer,
        method, parameters and storage dtype (a damaged or foreign file is simply rebuilt)."""
        from core.models import model_fingerprint, tokenizer_sha256
        from core.store import read_manifest

        if not target.is_file():
            return False
        try:
            manifest = read_manifest(target)
        except FastKVError:
            return False
        recorded = self.method if self.query_aware else self.method.for_question(None)
        built = manifest["model"]
        return (
            [(d["name"], d["sha256"]) for d in manifest["documents"]] == [(document.name, document.sha256)]
            and all(built.get(key) == value for key, value in model_fingerprint(engine.loaded).items())
            and manifest["tokenizer_sha256"] == tokenizer_sha256(engine.loaded.tokenizer)
            and manifest["method"] == {"name": recorded.name, "parameters": recorded.parameters()}
            and manifest["query_budget"] == (None if self.query_budget is None else str(self.query_budget))
            and manifest["steering_questions"] == len(self.questions)
            and (manifest["paused_layer"] is not None) == self.query_aware
            and manifest["dtype"] == self.cache_dtype
            and (manifest["dropped_tokens"] == 0 or self.truncate is not None)
        )


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


# --- running them --------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local runtime; else as ray.init takes it (auto, ray://host:10001)
    workers: int | None = None  # None: as many as the cluster's CPUs (GPUs with gpus_per_worker) allow
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0


def import_ray():
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'fastkv[ray]'") from None
    return ray


class Worker:
    """A Ray actor: loads the model once, then runs `run_item` on whatever the driver sends it."""

    def __init__(self, model: str | None, device: str | None, dtype: str | None):
        from core.engine import Engine

        self.engine, self.error = None, None
        try:
            from transformers.utils import logging

            logging.set_verbosity_error()
            logging.disable_progress_bar()
            self.engine = Engine.load(model, device, dtype)
        except FastKVError as error:  # told to the driver by ready(), not as a dead actor
            self.error = error

    def ready(self) -> tuple[int, str | None, int]:
        """-> (pid, the model's load error or None, its exit code)."""
        return os.getpid(), None if self.error is None else str(self.error), getattr(self.error, "exit_code", 0)

    def run(self, task: Task, item: Item) -> Outcome:
        return run_item(self.engine, task, item)


def run_ray(
    options: RayOptions,
    engine_spec: tuple[str | None, str | None, str | None],
    task: Task,
    items: Iterable[Item],
    on_outcome: Callable[[Outcome], None],
    read_bytes: bool = True,
    on_workers: Callable[[list[int]], None] = lambda pids: None,
) -> None:
    """The items on a pool of Ray workers, each with the model (`engine_spec`: model, device, dtype)
    loaded once; outcomes come back in the order they finish. A worker that dies has its item run
    again on a fresh one (at most WORKER_ATTEMPTS times), after removing whatever partial cache it
    left; each item is reported once. `read_bytes`: the driver reads each document and sends its
    bytes (a worker's node need not see the documents); caches are written by the workers, to a
    directory every node must see."""
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        start_ray(ray, options.address)
    queue, pending, actors = deque(items), {}, []
    try:
        remote = ray.remote(num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker)(Worker)
        count = max(1, min(len(queue), options.workers or pool_size(ray, options)))
        actors = [remote.remote(*engine_spec) for _ in range(count)]
        on_workers(check_ready(ray, actors))
        idle = list(range(count))
        while queue or pending:
            while idle and queue:
                slot, item = idle.pop(), queue.popleft()
                sent = item if not read_bytes or item.data is not None else replace(item, data=driver_bytes(item.name))
                pending[actors[slot].run.remote(task, sent)] = (slot, item)
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            slot, item = pending.pop(ref)
            idle.append(slot)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayActorError as error:
                remove_partial(task, item)
                ray.kill(actors[slot], no_restart=True)
                actors[slot] = remote.remote(*engine_spec)
                if item.attempt + 1 < WORKER_ATTEMPTS:
                    queue.appendleft(replace(item, attempt=item.attempt + 1))
                    continue
                outcome = Outcome(
                    item.index, item.name, error=f"the Ray workers running it died ({error})", exit_code=1
                )
            on_outcome(outcome)
    finally:  # Ctrl-C or an error: stop every worker, and only then remove what the busy ones were writing
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if pending:  # ray.kill returns at once; a killed worker's task ends (RayActorError) once it is gone
            ray.wait(list(pending), num_returns=len(pending), timeout=STOP_WAIT_S)
        if started_here:
            ray.shutdown()  # the local runtime and every worker process it started
        for _, item in pending.values():
            remove_partial(task, item)


def start_ray(ray, address: str | None) -> None:
    import logging

    kwargs = {"log_to_driver": False, "logging_level": logging.ERROR}
    try:
        if address is None:  # "local": a runtime of its own, never a cluster that RAY_ADDRESS or `ray start` names
            ray.init(address="local", include_dashboard=False, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise FastKVError(f"--ray {address or ''}: cannot start or join Ray ({error})".replace("  ", " ")) from None


def pool_size(ray, options: RayOptions) -> int:
    resources = ray.cluster_resources()
    if options.gpus_per_worker:
        return max(1, int(resources.get("GPU", 0) // options.gpus_per_worker))
    return max(1, int(resources.get("CPU", 1) // options.cpus_per_worker))


def check_ready(ray, actors: list) -> list[int]:
    """Wait for every worker's model; a model that does not load is the run's error, said once."""
    pids = []
    for pid, error, exit_code in ray.get([actor.ready.remote() for actor in actors]):
        if error is not None:
            raise (InputError if exit_code == 2 else FastKVError)(error)
        pids.append(pid)
    return pids


def driver_bytes(name: str) -> bytes | None:
    """A document's bytes as the driver reads them, for a worker on any node (stdin included); None
    where the driver cannot read it: the worker then tries, and reports the error as a local run would."""
    import sys

    try:
        if name == STDIN_PATH:
            stream = getattr(sys.stdin, "buffer", None)
            return stream.read() if stream is not None else b""
        return Path(name).read_bytes()
    except OSError:
        return None
