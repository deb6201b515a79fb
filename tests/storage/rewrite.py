"""Helpers for the storage tests: a loader's refusal without its path, and .fkv files rewritten with an edited
manifest or edited tensors."""

import json
import struct
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save

from core.errors import CacheFileError
from core.storage import MANIFEST_KEY, tensors_sha256


def refusal(read, path: Path, *args) -> str:
    """The CacheFileError message of read(path, *args), without the path it starts with (the path
    holds the test's name, which must not satisfy the assertions on the cause)."""
    with pytest.raises(CacheFileError) as error:
        read(path, *args)
    message = str(error.value)
    assert message.startswith(f"{path}: "), message
    return message.removeprefix(f"{path}: ")


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join_safetensors(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text + body


def rewrite_manifest(source: Path, target: Path, edit) -> Path:
    """Copy `source` to `target` with edit(manifest) applied to the header's manifest (tensors untouched); `edit`
    None removes the manifest, a string replaces its text."""
    header, body = split_safetensors(source.read_bytes())
    metadata = header["__metadata__"]
    if callable(edit):
        manifest = json.loads(metadata[MANIFEST_KEY])
        edit(manifest)
        metadata[MANIFEST_KEY] = json.dumps(manifest)
    elif edit is None:
        del metadata[MANIFEST_KEY]
    else:
        metadata[MANIFEST_KEY] = edit
    target.write_bytes(join_safetensors(header, body))
    return target


def rewrite_tensors(source: Path, target: Path, edit, rehash: bool = True) -> Path:
    """Re-save `source` with edit(tensors) applied; with `rehash`, the manifest's checksum is updated so
    the load gets past the checksum to the structural check under test."""
    tensors = load_file(source)
    with safe_open(str(source), framework="pt") as f:
        metadata = f.metadata()
    edit(tensors)
    manifest = json.loads(metadata[MANIFEST_KEY])
    if rehash:
        manifest["tensors_sha256"] = tensors_sha256(tensors)
    target.write_bytes(save(tensors, metadata={MANIFEST_KEY: json.dumps(manifest)}))
    return target


def update(name, change):
    return lambda tensors: tensors.update({name: change(tensors[name])})


def delete(*keys):
    def edit(manifest):
        target = manifest
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]

    return edit


def assign(value, *keys):
    def edit(manifest):
        target = manifest
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return edit
