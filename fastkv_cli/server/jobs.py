"""The server's job queue: one request's work (Job), the one thread that runs jobs on the model (ModelQueue),
and how a failed job is reported (RequestError, Cancelled, error_event)."""

import asyncio
import os
import queue
import threading
import traceback
from collections.abc import Callable

from core.errors import FastKVError, InputError

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


class Job:
    """One request's work on the model thread; its events reach the request's event loop in order."""

    def __init__(self, work: Callable[["Job"], None], loop: asyncio.AbstractEventLoop):
        self.work = work
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.reason = "the client left"

    def emit(self, event: dict) -> None:  # from the model thread
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


class ModelQueue:
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
        """Stop, then wait for the model thread to finish what cannot be cut (a cache file being written)."""
        self.stop()
        self.jobs.put(None)
        self.thread.join()
