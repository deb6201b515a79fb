"""Reading and writing .fkv files: the atomic save, the verified load, the manifest alone, what `cache info` shows,
and the checks of an output path before any work is done.

Loading never unpickles: safetensors holds only raw tensors and a string header. Every field of the manifest is
checked, the tensor data is checksummed, and writes are atomic. See docs/cache-format.md for the format.
"""

import hashlib
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from core.atomic import write_bytes_atomic
from core.errors import CacheFileError, FastKVError, InputError
from core.kvcache import KVCache, page_coverage
from core.storage.codecs import cache_from_tensors, cache_tensors, check_cache_dtype, codec_for
from core.storage.manifest import Manifest, Storage

MANIFEST_KEY = "fastkv.manifest"


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_target(path: Path, force: bool) -> None:
    """Refuse an output path before any work is done, not after a long prefill."""
    if path.is_dir():
        raise InputError(f"{path}: is a directory; -o takes a file path")
    if path.exists() and not force:
        raise InputError(f"{path}: exists; pass --force to overwrite it")
    if not path.parent.exists():
        raise InputError(f"{path.parent}: no such directory")
    if not path.parent.is_dir():
        raise InputError(f"{path.parent}: not a directory")
    check_writable(path.parent)


def check_writable(directory: Path) -> None:
    """Create and remove a file in `directory`: the only test that also holds for root (permission
    bits do not stop root; a read-only mount, a full inode table or sysfs still do)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".fastkv-probe-", dir=directory)
    except OSError as error:
        raise InputError(f"{directory}: cannot write there ({error.strerror or error})") from None
    os.close(fd)
    os.unlink(probe)


def save_cache(
    path: Path, cache: KVCache, manifest: Manifest, dtype: str = "float16", force: bool = False, model=None
) -> int:
    """Write `cache` and `manifest` (its storage filled in here) to `path` atomically; returns the file size in bytes.
    `model` (the Runner) is needed for coded storage."""
    check_cache_dtype(dtype, cache.paused is not None)
    check_target(path, force)
    scheme = codec_for(dtype).scheme(manifest.model, manifest.paused_layer)
    tensors = cache_tensors(cache, dtype, scheme, model)
    stored = replace(manifest, storage=Storage(dtype, scheme, tensors_sha256(tensors))).to_dict()
    Manifest.from_dict(stored)  # what is written is what a load accepts
    data = save(tensors, metadata={MANIFEST_KEY: json.dumps(stored)})
    try:
        write_bytes_atomic(path, data, overwrite=force)
    except FileExistsError:  # another process wrote it since check_target
        raise InputError(f"{path}: exists; pass --force to overwrite it") from None
    except OSError as error:  # a full disk, a directory made read-only meanwhile, ...
        raise FastKVError(f"{path}: cannot write the cache ({error.strerror or error})") from None
    return len(data)


def read_manifest(path: Path) -> Manifest:
    """The manifest alone (for `cache info` and compatibility checks), checked."""
    with open_cache(path) as f:
        return parse_manifest(path, f.metadata())


def load_cache(
    path: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, model=None
) -> tuple[KVCache, Manifest]:
    """Load and verify a .fkv file -> (cache on `device` in `dtype`, manifest). `model` (the Runner) rebuilds
    layer 0 of a query-aware cache from its token ids and puts RoPE back on a coded file's keys; without it
    (`cache info`) that layer holds only its positions and coded keys stay as stored."""
    with open_cache(path) as f:
        manifest = parse_manifest(path, f.metadata())
        try:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as error:  # safetensors raises its own error types on damaged data
            raise CacheFileError(f"{path}: damaged tensor data ({error})") from None
    if tensors_sha256(tensors) != manifest.storage.tensors_sha256:
        raise CacheFileError(f"{path}: tensor data does not match its checksum (the file was damaged or modified)")
    try:
        return cache_from_tensors(tensors, manifest, device, dtype, model), manifest
    except CacheFileError as error:
        raise CacheFileError(f"{path}: {error}") from None


def describe_cache(path: Path) -> dict:
    """What `cache info` shows, as JSON-ready data: the verified manifest, sizes, and per-page share of kept tokens."""
    cache, manifest = load_cache(path)
    return {
        "file": str(path),
        "file_bytes": path.stat().st_size,
        "manifest": manifest.to_dict(),
        "reconstruction_scored": manifest.method.reconstructs,  # else scored by its window's queries
        "kept_tokens_per_layer": cache.kept_tokens_per_layer,
        "paused_bytes": 0 if cache.paused is None else cache.paused.nbytes,
        "page_coverage": [page_coverage(cache, document.page_token_spans) for document in manifest.documents],
    }


def open_cache(path: Path):
    if not path.is_file():
        raise CacheFileError(f"{path}: no such cache file")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as error:  # not safetensors, truncated header, bad JSON header, ...
        if expected := declared_size(path):
            if expected > path.stat().st_size:
                raise CacheFileError(
                    f"{path}: truncated ({path.stat().st_size:,} of {expected:,} bytes); rebuild it"
                ) from None
        raise CacheFileError(f"{path}: not a fastkv cache file (not readable as safetensors: {error})") from None


def declared_size(path: Path) -> int | None:
    """The size a safetensors header says its file has (None: no readable header), to tell a
    truncated cache from a file that never was one."""
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = f.read(min(header_len, 100 << 20))
    if len(header) < header_len:
        return 8 + header_len if header.startswith(b'{"') else None
    try:
        entries = json.loads(header)
        return 8 + header_len + max(e["data_offsets"][1] for k, e in entries.items() if k != "__metadata__")
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
        return None


def parse_manifest(path: Path, metadata: dict | None) -> Manifest:
    if not metadata or MANIFEST_KEY not in metadata:
        raise CacheFileError(f"{path}: a safetensors file, but not a fastkv cache (no manifest)")
    try:
        data = json.loads(metadata[MANIFEST_KEY])
    except (ValueError, RecursionError):  # ValueError: bad JSON, or an int of more than 4,300 digits
        raise CacheFileError(f"{path}: the manifest is not valid JSON") from None
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # "\udcff" escapes: valid JSON, but not text that can be printed
        raise CacheFileError(f"{path}: the manifest holds invalid Unicode text") from None
    try:
        return Manifest.from_dict(data)
    except CacheFileError as error:
        raise CacheFileError(f"{path}: {error}") from None
