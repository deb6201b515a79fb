"""What a server allows (its directories, token, queue, cache memory, upload size) and the path checks that hold
a client to its --allow-dir."""

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from core.errors import InputError
from fastkv_cli.server.jobs import RequestError

MIB = 1 << 20


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
