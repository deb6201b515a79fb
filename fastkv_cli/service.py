"""What `fastkv serve` runs behind HTTP: one model worker (a bounded queue, one job at a time), an LRU of
loaded .fkv caches within a memory budget, and the paths a client may name (--allow-dir)."""

import asyncio
import dataclasses
import hmac
import io
import os
import queue
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.documents import Document, read_document
from core.engine import Engine, SavedContext
from core.errors import FastKVError, InputError

MIB = 1 << 20
END = {"event": "end"}  # a job's last event; never sent to the client


class RequestError(InputError):
    """A request refused before it runs: an HTTP status, one line, and the CLI's exit code for it."""

    def __init__(self, status: int, message: str, exit_code: int = 2):
        super().__init__(message)
        self.status = status
        self.exit_code = exit_code


class Cancelled(FastKVError):
    """A job stopped before its end: its client left, or the server is shutting down."""


def error_status(error: BaseException) -> int:
    """The HTTP status of a failed request: 4xx for bad input, 503 for a stopped job, 500 otherwise."""
    if isinstance(error, RequestError):
        return error.status
    if isinstance(error, Cancelled):
        return 503
    if isinstance(error, InputError):
        return 400
    return 500


def error_event(error: BaseException) -> dict:
    """The JSON error of every failure: the CLI prints `message` as its one line and exits `exit_code`."""
    if isinstance(error, FastKVError):
        message, kind, code = str(error), type(error).__name__, error.exit_code
    else:  # a bug: one line to the client, the traceback only in the server's log with FASTKV_DEBUG=1
        message, kind, code = f"internal error: {type(error).__name__}: {error}", "InternalError", 1
    return {
        "event": "error",
        "status": error_status(error),
        "error": {"message": message, "type": kind, "exit_code": code},
    }


@dataclass(frozen=True)
class Settings:
    """What a server allows: its directories, token, queue, cache memory and upload size."""

    allow_dirs: tuple[Path, ...]
    token: str | None = None
    queue_size: int = 4
    cache_memory_bytes: int = 2048 * MIB
    max_body_bytes: int = 32 * MIB

    @classmethod
    def of(cls, dirs: list[Path], token: str | None, queue_size: int, cache_memory_mb: int, max_upload_mb: int):
        resolved = []
        for directory in dirs:
            if not directory.is_dir():
                raise InputError(f"--allow-dir {directory}: not a directory")
            resolved.append(Path(os.path.realpath(directory)))
        if queue_size < 0:
            raise InputError(f"--queue must be at least 0, got {queue_size}")
        return cls(tuple(resolved), token or None, queue_size, cache_memory_mb * MIB, max_upload_mb * MIB)

    def token_ok(self, authorization: str | None) -> bool:
        if self.token is None:
            return True
        scheme, _, given = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())

    def path(self, raw: str, what: str = "path") -> Path:
        """`raw` resolved on the server (a relative path: against the first --allow-dir), refused with 403
        unless it lies inside an allowed directory once every symlink is followed."""
        if not raw or "\x00" in raw:
            raise RequestError(400, f"{raw!r}: not a {what}")
        path = Path(raw).expanduser()
        real = Path(os.path.realpath(path if path.is_absolute() else self.allow_dirs[0] / path))
        if not any(real == root or root in real.parents for root in self.allow_dirs):
            raise RequestError(403, f"{raw}: outside the directories this server may use (--allow-dir)")
        return real


class Job:
    """One request's work on the model worker; its events reach the request's event loop in order."""

    def __init__(self, work: Callable[["Job"], None], loop: asyncio.AbstractEventLoop):
        self.work = work
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.reason = "the client left"

    def emit(self, event: dict) -> None:  # from the worker thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self, reason: str = "the client left") -> None:
        if not self.cancelled.is_set():
            self.reason = reason
            self.cancelled.set()

    def check(self) -> None:
        """Called from the model's callbacks (each prefill layer, each answer token): stop here if cancelled."""
        if self.cancelled.is_set():
            raise Cancelled(f"cancelled: {self.reason}")

    def text(self, text: str) -> None:
        self.check()
        if text:
            self.emit({"event": "text", "text": text})

    def progress(self, step: str, done: int, total: int) -> None:
        if done < total or not total:  # a step's end is told without stopping: what it ends (a file written) is done
            self.check()
        self.emit({"event": "progress", "step": step, "done": done, "total": total})


class Worker:
    """The one thread that runs jobs on the model, one at a time (batch size 1), from a bounded queue."""

    def __init__(self, queue_size: int):
        self.queue_size = queue_size
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size + 1)  # +1: room for the stop sentinel
        self.current: Job | None = None
        self.pending = 0  # jobs accepted and not finished: the running one and those waiting
        self.stopping = threading.Event()
        self.counts = {"completed": 0, "failed": 0, "cancelled": 0}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.run, name="fastkv-model", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`, or refuse it (503) when one runs and --queue more already wait."""
        with self.lock:
            if self.stopping.is_set():
                raise RequestError(503, "the server is shutting down", exit_code=1)
            if self.pending >= 1 + self.queue_size:
                raise RequestError(
                    503, f"the server is busy: 1 request running and {self.pending - 1} waiting (--queue)", exit_code=1
                )
            self.pending += 1
            self.jobs.put_nowait(job)

    def status(self) -> dict:
        with self.lock:
            running = self.current is not None
            return {"running": running, "waiting": self.pending - running, "size": self.queue_size, **self.counts}

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            with self.lock:
                self.current = job
            outcome = self.execute(job)
            with self.lock:
                self.current = None
                self.pending -= 1
                self.counts[outcome] += 1
            job.emit(END)

    @staticmethod
    def execute(job: Job) -> str:
        """Run one job; every failure goes back to its client as one JSON error event."""
        try:
            job.check()
            job.work(job)
            return "completed"
        except Cancelled as error:
            job.emit(error_event(error))
            return "cancelled"
        except Exception as error:
            if not isinstance(error, FastKVError) and os.environ.get("FASTKV_DEBUG") == "1":
                traceback.print_exc()
            job.emit(error_event(error))
            return "failed"

    def stop(self, reason: str = "the server is shutting down") -> None:
        """Cancel the running job and every waiting one (safe in a signal handler: it only sets flags)."""
        self.stopping.set()
        current = self.current
        if current is not None:
            current.cancel(reason)
        for job in list(self.jobs.queue):
            if job is not None:
                job.cancel(reason)

    def close(self) -> None:
        """Stop, then wait for the worker to finish what cannot be cut (a cache file being written)."""
        self.stop()
        self.jobs.put(None)
        self.thread.join()


def cache_bytes(saved: SavedContext) -> int:
    paused = saved.cache.paused
    return saved.cache.nbytes + (0 if paused is None else paused.nbytes)


class CacheLRU:
    """Loaded .fkv caches within a memory budget, least recently used evicted first. A file rewritten since
    it was loaded (another mtime or size) is loaded again; one larger than the budget is used, not kept."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: OrderedDict[tuple, tuple[SavedContext, int]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, path: Path, engine: Engine) -> SavedContext:
        try:
            stat = path.stat()
            key = (str(path), stat.st_mtime_ns, stat.st_size)
        except OSError:
            key = None  # the loader explains what is wrong with the path
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return self.entries[key][0]
        saved = engine.load_saved(path)
        if key is not None:
            self.keep(key, saved)
        return saved

    def keep(self, key: tuple, saved: SavedContext) -> None:
        size = cache_bytes(saved)
        with self.lock:
            for old in [old for old in self.entries if old[0] == key[0]]:
                del self.entries[old]
            if size > self.budget:
                return
            self.entries[key] = (saved, size)
            while self.used() > self.budget:
                self.entries.popitem(last=False)

    def used(self) -> int:
        return sum(size for _, size in self.entries.values())

    def summary(self) -> dict:
        with self.lock:
            return {"loaded": len(self.entries), "bytes": self.used(), "budget_bytes": self.budget}


def uploaded_document(name: str, data: bytes) -> Document:
    """A document sent in the request (stdin, message content) read as core reads stdin: text or PDF."""
    document = read_document("-", stdin=io.BytesIO(data))
    return document if name == document.name else dataclasses.replace(document, name=name)


def named_document(path: Path, name: str, on_page) -> Document:
    """A file on the server, named as the client typed it: the name is part of the prompt and the answer."""
    document = read_document(str(path), on_page=on_page)
    return dataclasses.replace(document, name=name)
