"""Timings and sizes of one answer (plain data; the CLI renders it, bench/ and tests read it)."""

import time
from dataclasses import asdict, dataclass, field


@dataclass
class RunStats:
    """Seconds as floats; None where a step did not happen in this run. A load that later runs reuse (the
    model, a saved cache) is in the stats of the first run that waited for it only (see SharedLoad)."""

    load_s: float | None = None
    read_s: float | None = None
    tokenize_s: float | None = None
    cache_load_s: float | None = None
    prefill_s: float | None = None  # of a saved-cache query: the question's prefill only
    ttft_s: float | None = None  # the run's own: from its start (inputs read, loads done) to its first token
    decode_tokens_per_s: float | None = None
    new_tokens: int = 0
    context_tokens: int = 0
    dropped_tokens: int = 0  # cut by --truncate middle
    kv_bytes_full: int = 0  # an uncompressed cache of the context, same dtype
    kv_bytes_kept: int = 0
    kept_tokens_per_layer: list[int] = field(default_factory=list)
    layer_tokens: list[int] = field(default_factory=list)  # tokens each prefill layer ran on (TSP shrinks it)
    dropped_tokens_estimated: bool = False  # part of the dropped text was skipped unread: counted from its size

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SharedLoad:
    """A load that several runs share, such as the model or a saved cache: its seconds go into the stats of
    the first run that waited for it, and every later run reports None, having reused what was loaded."""

    seconds: float | None = None
    claimed: bool = False

    def claim(self) -> float | None:
        """The seconds for the first caller; None for every later one."""
        seconds = None if self.claimed else self.seconds
        self.claimed = True
        return seconds


class Stopwatch:
    """Seconds since construction or the last lap."""

    def __init__(self):
        self.start = self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed

    def total(self) -> float:
        return time.perf_counter() - self.start
