"""Corpus runs on a Ray cluster: a pool of workers, each with the model loaded once, running the same per-item
function as a local run (core/corpus.py: run_item), so answers are identical (DESIGN.md §11). The only module
that imports ray, and only when a run asks for it."""

import os
import sys
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from core.corpus import Item, Outcome, Task, remove_partial, run_item
from core.documents import STDIN_PATH
from core.errors import FastKVError, InputError

WORKER_ATTEMPTS = 3  # runs of one item on workers that died under it before it is reported as failed
STOP_WAIT_S = 10.0  # an interrupted run waits this long for its killed workers to be gone


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


class RayWorker:
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
        remote = ray.remote(num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker)(RayWorker)
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
    try:
        if name == STDIN_PATH:
            stream = getattr(sys.stdin, "buffer", None)
            return stream.read() if stream is not None else b""
        return Path(name).read_bytes()
    except OSError:
        return None
