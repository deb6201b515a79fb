"""The server's loaded .fkv caches: an LRU within a memory budget, so that questions to one file skip its load."""

import threading
from collections import OrderedDict
from pathlib import Path

from core.engine import Engine, SavedContext


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
