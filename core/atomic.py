"""Atomic file writes: a reader sees the old file or the whole new one, never a partial file."""

import os
import tempfile
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def write_bytes_atomic(path: Path, data: bytes, overwrite: bool = True) -> None:
    """Write `data` to a temp file beside `path`, fsync it, then rename it over `path`.

    Whatever interrupts the write (an error, Ctrl-C, a full disk), the temp file is removed and
    `path` is left as it was. Concurrent writers each write their own temp file: with `overwrite`
    the last rename wins; without it, the first one wins and the others raise FileExistsError.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            publish_new(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish_new(tmp: Path, path: Path) -> None:
    """Move `tmp` to `path` only if `path` does not exist, atomically: a hard link never replaces a name."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links: check, then rename (a reader never sees a partial file)
        if path.exists():
            raise FileExistsError(17, "File exists", str(path)) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def write_all(f, data: bytes, chunk: int = 1 << 24) -> None:
    view = memoryview(data)
    for start in range(0, len(view), chunk):
        f.write(view[start : start + chunk])


def temp_files(path: Path) -> list[Path]:
    """The temp files that writes of `path` left behind: only a killed process (SIGKILL, power loss)
    leaves one; whoever retries its work removes them."""
    return sorted(path.parent.glob(f".{glob_escape(path.name)}.*{TEMP_SUFFIX}"))


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
