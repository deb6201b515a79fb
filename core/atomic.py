"""Atomic file writes: a reader sees the old file or the whole new one, never a partial file."""

import os
import tempfile
from pathlib import Path


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync it, then rename it over `path`.

    Whatever interrupts the write (an error, Ctrl-C, a full disk), the temp file is removed and
    `path` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_all(f, data: bytes, chunk: int = 1 << 24) -> None:
    view = memoryview(data)
    for start in range(0, len(view), chunk):
        f.write(view[start : start + chunk])
