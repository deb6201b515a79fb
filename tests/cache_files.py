"""Saved cache files rewritten on purpose, for the refusals of core/store.py to be tested: an edited manifest,
edited tensors, an older format's layout; and the message a refused read gives."""

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from core.errors import CacheFileError
from core.store import MANIFEST_KEY, tensors_sha256


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
    """Copy `source` to `target` with edit(manifest) applied to the header's manifest (tensors untouched)."""
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


def with_paused_positions(tensors, context: int | None = None):
    """A version 7 or older file's tensors: the positions of a paused prefill's layers stored too.
    `context`: the file's context tokens, where its hidden states are quantized codes."""
    context = context or tensors["paused.hidden"].shape[0]
    kv_heads = tensors["layers.1.keys.scale" if "layers.1.keys.scale" in tensors else "layers.1.keys"].shape[0]
    for name in [name for name in tensors if name.endswith(".keys")]:
        every = torch.arange(context, dtype=torch.int32).repeat(kv_heads, 1)
        tensors.setdefault(name.removesuffix("keys") + "positions", every)
