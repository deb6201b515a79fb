"""Fuzzing the .fkv loader: every mutant of a valid cache file loads and passes every integrity check,
or is refused with CacheFileError; nothing raises anything else."""

import copy
import io
import json
import random
import struct
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load, save

from core.engine import Engine
from core.errors import CacheFileError
from core.kvcache import EMPTY
from core.methods import Budget, make_method
from core.models import LoadedModel
from core.options import BuildPlan
from core.storage import MANIFEST_KEY, describe_cache, load_cache, read_manifest, save_cache, tensors_sha256
from fastkv_cli.render import cache_info_view
from tests.helpers import make_document

SEED = 6
MUTANTS = 2000  # ~10 s on one idle core
DEADLINE_S = 60  # a safety net on a slow machine: stop early, still report the count
SAFETENSORS_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "XX"]
HOSTILE_TEXT = ["[bold]", "[/red]", "[link=x]", "\u202e", "\x00", "\x1b[2J", "\udcff", "日本語", "\n", "x" * 500]
PAGES = [
    " ".join(f"In {1800 + i} the keeper logged {i} ships and {i % 7} storms." for i in range(4)),
    " ".join(f"Page two, line {i}: the lamp burned {i * 3} litres of oil." for i in range(4)),
]
# (family, method, parameters, cache dtype, build options): one source file each
SOURCES = [
    ("llama", "fastkv", {"budget": "30%"}, "float16", {}),
    ("qwen3", "fullkv", {}, "float32", {}),
    ("mistral", "snapkv", {"budget": "20%"}, "bfloat16", {"query_budget": Budget.parse("10%")}),
    ("qwen2", "streamingllm", {"budget": "16"}, "float16", {"questions": ["Who kept the light?"]}),
    ("llama", "fastkv", {"budget": "20%"}, "float32", {"query_aware": True}),
    ("qwen2", "snapkv", {"budget": "40%"}, "int8", {}),
    ("llama", "fastkv", {"budget": "20%"}, "int4", {"query_aware": True}),
    ("mistral", "fastkv", {"budget": "20%"}, "int6", {"query_aware": True}),
    ("qwen2", "fastkv", {"budget": "20%"}, "coded", {"query_aware": True}),
]
CODED_DTYPES = {  # a coded file's parts (core/storage/coded.py)
    "coded.words": torch.int16,
    "coded.lengths": torch.int64,
    "coded.tables": torch.int16,
    "coded.classes": torch.uint8,
    "coded.centers": torch.int32,
    "coded.escapes": torch.int64,
}


@pytest.fixture(scope="module")
def sources(tiny_models, tiny_tokenizer, tmp_path_factory) -> list[bytes]:
    """The bytes of valid .fkv files: four families, methods and cache dtypes, one or two documents, and
    a query-aware (paused) cache."""
    folder = tmp_path_factory.mktemp("fuzz-sources")
    documents = [make_document(PAGES, "logbook.txt"), make_document(PAGES[:1], "notes.md")]
    files = []
    for i, (family, method, parameters, dtype, options) in enumerate(SOURCES):
        model = copy.deepcopy(tiny_models[family])
        model.resize_token_embeddings(len(tiny_tokenizer), mean_resizing=False)
        engine = Engine(LoadedModel(model, tiny_tokenizer, family, folder))
        plan = BuildPlan(
            make_method(method, **parameters),
            options.get("query_budget"),
            tuple(options.get("questions", [])),
            query_aware=options.get("query_aware", False),
        )
        saved = engine.build(documents[: 1 + i % 2], plan)
        path = folder / f"{i}.fkv"
        save_cache(path, saved.cache, saved.manifest, dtype, model=engine.runner)
        files.append(path.read_bytes())
    return files


# --- the file's parts -------------------------------------------------------------------------------


def split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def manifest_of(header: dict) -> dict:
    return json.loads(header["__metadata__"][MANIFEST_KEY])


def with_manifest(header: dict, manifest) -> dict:
    header["__metadata__"][MANIFEST_KEY] = manifest if isinstance(manifest, str) else json.dumps(manifest)
    return header


# --- random values -----------------------------------------------------------------------------------


def random_scalar(rng: random.Random):
    return rng.choice(
        [
            None,
            True,
            False,
            0,
            -1,
            1,
            rng.randint(-(10**6), 10**6),
            rng.choice([2**31, 2**63, 10**30, -(2**63)]),
            rng.random() * 10 ** rng.randint(-5, 30),
            float("nan"),
            float("inf"),
            "",
            "10%",
            "float16",
            "llama",
            rng.choice(HOSTILE_TEXT),
            "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(1, 12))),
        ]
    )


def random_json(rng: random.Random, depth: int = 0):
    kind = rng.random()
    if depth > 3 or kind < 0.5:
        return random_scalar(rng)
    if kind < 0.75:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {
        rng.choice(["model", "documents", "x", "format_version", ""]): random_json(rng, depth + 1) for _ in range(3)
    }


def paths_in(value, prefix=()) -> list[tuple]:
    """Every key path inside a JSON value, e.g. ("documents", 0, "page_token_spans", 1, 0)."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths_in(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += paths_in(item, (*prefix, i))
    return found


def value_at(value, path: tuple):
    for key in path:
        value = value[key]
    return value


def replaced(value, path: tuple, new, delete: bool = False):
    if not path:
        return new
    value = copy.deepcopy(value)
    target = value
    for key in path[:-1]:
        target = target[key]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = new
    return value


# --- mutations: each takes the rng and the file's bytes, returns (description, new bytes) ------------------


def truncate(rng, data):
    at = rng.randrange(len(data))
    return f"truncate at {at}", data[:at]


def flip_bytes(rng, data):
    data = bytearray(data)
    (length,) = struct.unpack("<Q", data[:8])
    region = rng.choice([(0, len(data)), (0, 8 + length), (8 + length, len(data))])
    offsets = [rng.randrange(*region) for _ in range(rng.choice([1, 1, 2, 8]))]
    for offset in offsets:
        data[offset] ^= rng.randint(1, 255)
    return f"flip bytes at {offsets[:3]}", bytes(data)


def header_length(rng, data):
    (length,) = struct.unpack("<Q", data[:8])
    new = rng.choice([0, 1, 7, length - 1, length + 1, length - 8, length + 8, len(data), 2**63, 2**64 - 1])
    new = max(0, min(new, 2**64 - 1))
    return f"header length {new}", struct.pack("<Q", new) + data[8:]


def random_manifest(rng, data):
    header, body = split(data)
    manifest = rng.choice([json.dumps(random_json(rng)), "", "{", "[" * 5000, "1" * 5000, "{}"])
    if rng.random() < 0.3:  # keep the shape, scramble the values
        manifest = {key: random_json(rng) for key in manifest_of(header)}
    return "random manifest", join(with_manifest(header, manifest), body)


def manifest_field(rng, data):
    header, body = split(data)
    manifest = manifest_of(header)
    path = rng.choice(paths_in(manifest)[1:])
    action = rng.random()
    strings = [p for p in paths_in(manifest)[1:] if isinstance(value_at(manifest, p), str)]
    if action < 0.15:  # text the CLI prints: markup, control characters, escapes that are not Unicode
        path = rng.choice(strings)
        edited, what = replaced(manifest, path, rng.choice(HOSTILE_TEXT) + value_at(manifest, path)), "text"
    elif action < 0.3 and isinstance(path[-1], str):
        edited, what = replaced(manifest, path, None, delete=True), "delete"
    elif action < 0.5:
        edited, what = replaced(manifest, path, random_scalar(rng)), "scalar"
    else:
        edited, what = replaced(manifest, path, random_json(rng)), "json"
    return f"manifest {what} at {path}", join(with_manifest(header, edited), body)


def tensor_info(rng, data):
    """Edit a tensor's dtype, shape or data offsets in the header, leaving the bytes as they are."""
    header, body = split(data)
    name = rng.choice([key for key in header if key != "__metadata__"])
    entry = header[name]
    what = rng.choice(["dtype", "shape", "offsets", "swap"])
    if what == "dtype":
        entry["dtype"] = rng.choice(SAFETENSORS_DTYPES)
    elif what == "shape":
        shape = entry["shape"]
        entry["shape"] = rng.choice(
            [shape[::-1], [], [0], shape + [1], shape[:-1], [dim + rng.choice([-1, 1]) for dim in shape], [-1]]
        )
    elif what == "offsets":
        start, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[start, end + 2], [start + 2, end], [end, start], [0, end], [start, 2**40]])
    else:
        other = header[rng.choice([key for key in header if key != "__metadata__"])]
        entry["dtype"], other["dtype"] = other["dtype"], entry["dtype"]
        entry["shape"], other["shape"] = other["shape"], entry["shape"]
    return f"header {what} of {name}", join(header, body)


def header_entries(rng, data):
    """Duplicate or drop tensor entries in the header only (the data region stays as it was)."""
    header, body = split(data)
    names = [key for key in header if key != "__metadata__"]
    layers = 1 + max(int(name.split(".")[1]) for name in names)
    layer = rng.randrange(layers)
    if rng.random() < 0.5:
        for part in ("keys", "values", "positions"):
            header[f"layers.{rng.choice([layer + 1, layers])}.{part}"] = dict(header[f"layers.{layer}.{part}"])
        return f"header duplicates layer {layer}", join(header, body)
    for part in rng.sample(["keys", "values", "positions"], rng.randint(1, 3)):
        del header[f"layers.{layer}.{part}"]
    return f"header drops layer {layer}", join(header, body)


def tensor_edit(rng, data):
    """Re-save the tensors with one layer duplicated, dropped or edited; the checksum fixed half the time."""
    header, _ = split(data)
    manifest = manifest_of(header)
    tensors = dict(load(data))
    layers = manifest["model"]["num_layers"]
    layer = rng.randrange(layers)
    what = rng.choice(["duplicate", "drop", "swap-dtype", "reshape", "positions", "extra", "empty"])
    name = f"layers.{layer}.{rng.choice(['keys', 'values', 'positions'])}"
    if what == "duplicate":
        target = rng.choice([layers, (layer + 1) % layers])
        for part in ("keys", "values", "positions"):
            tensors[f"layers.{target}.{part}"] = tensors[f"layers.{layer}.{part}"].clone()
    elif what == "drop":
        for part in rng.sample(["keys", "values", "positions"], rng.randint(1, 3)):
            del tensors[f"layers.{layer}.{part}"]
    elif what == "swap-dtype":
        tensors[name] = tensors[name].to(
            rng.choice([torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8])
        )
    elif what == "reshape":
        t = tensors[name]
        tensors[name] = rng.choice([t.reshape(-1), t.transpose(0, 1), t[:, :-1], t[:1], t.unsqueeze(0)]).contiguous()
    elif what == "positions":
        p = tensors[f"layers.{layer}.positions"]
        tensors[f"layers.{layer}.positions"] = rng.choice(
            [p.flip(-1), p * 0, p + manifest["context_tokens"], p - 1, torch.randint(-5, 10**6, p.shape, dtype=p.dtype)]
        ).contiguous()
    elif what == "extra":
        tensors[rng.choice(["layers.x.keys", "extra", f"layers.{layer}.bias"])] = torch.zeros(2)
    else:
        kv, _, dim = tensors[f"layers.{layer}.keys"].shape
        dtype = tensors[f"layers.{layer}.keys"].dtype
        tensors[f"layers.{layer}.keys"] = torch.zeros(kv, 0, dim, dtype=dtype)
        tensors[f"layers.{layer}.values"] = torch.zeros(kv, 0, dim, dtype=dtype)
        tensors[f"layers.{layer}.positions"] = torch.zeros(kv, 0, dtype=torch.int32)
    rehash = rng.random() < 0.5
    if rehash:
        manifest["tensors_sha256"] = tensors_sha256(tensors)
    return f"tensors {what} {name}{' rehashed' if rehash else ''}", save(
        tensors, metadata={MANIFEST_KEY: json.dumps(manifest)}
    )


def coded_edit(rng, data):
    """Re-save a coded file with one coded part or step damaged; the checksum fixed half the time."""
    header, _ = split(data)
    manifest = manifest_of(header)
    tensors = dict(load(data))
    name = rng.choice([n for n in tensors if n.startswith("coded.") or n.endswith(".step")])
    t = tensors[name]
    tensors[name] = rng.choice([
        t[:-1], torch.cat([t, t[:1]]), t.flip(0), t * 0, -t, t + 1, t.to(torch.int64), t.to(torch.float32),
        t.reshape(-1) if t.dim() > 1 else t.unsqueeze(0),
        torch.full_like(t, 1e30 if t.is_floating_point() else 2**15 - 1),
    ]).contiguous()  # fmt: skip
    rehash = rng.random() < 0.5
    if rehash:
        manifest["tensors_sha256"] = tensors_sha256(tensors)
    return f"coded {name}{' rehashed' if rehash else ''}", save(tensors, metadata={MANIFEST_KEY: json.dumps(manifest)})


MUTATIONS = [
    truncate,
    flip_bytes,
    header_length,
    random_manifest,
    manifest_field,
    tensor_info,
    header_entries,
    tensor_edit,
    coded_edit,
]


def mutate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """One to three mutations in a row (a later one may fail on what an earlier one broke: skip it)."""
    steps = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        mutation = rng.choice(MUTATIONS)
        try:
            what, data = mutation(rng, data)
        except (ValueError, KeyError, IndexError, TypeError, RuntimeError, struct.error, AttributeError):
            continue  # the bytes no longer have the structure this mutation edits
        except Exception as error:  # safetensors' own error type on bytes it cannot parse
            if type(error).__name__ != "SafetensorError":
                raise
            continue
        steps.append(what)
        if not data:
            break
    return " + ".join(steps) or "unchanged", data


# --- the checks --------------------------------------------------------------------------------------------


def assert_intact(path: Path, data: bytes) -> None:
    """A mutant that loaded: everything the loader promises holds, checked independently."""
    cache, manifest = load_cache(path)
    model, storage, context = manifest.model, manifest.storage, manifest.context_tokens
    stored = dict(load(data))
    assert tensors_sha256(stored) == storage.tensors_sha256
    stored_as = storage.dtype if storage.quantization is None else "float32"  # de-quantized on load
    for name, tensor in stored.items():  # a quantized file's codes, finite positive scales, finite zeros
        if storage.dtype == "coded":  # a coded file's parts and steps, and float16 for the rest
            if name.endswith(".step"):
                assert tensor.dtype == torch.float32 and tensor.shape == (1,) and 0 < float(tensor) < float("inf")
            elif not name.endswith(".positions") and name != "paused.ids":
                assert tensor.dtype == CODED_DTYPES.get(name, torch.float16)
        elif name.endswith((".scale", ".zero")):
            assert tensor.dtype == torch.float16 and bool(tensor.isfinite().all())
            assert name.endswith(".zero") or bool((tensor > 0).all())
        elif storage.quantization is not None and not name.endswith(".positions") and name != "paused.ids":
            assert tensor.dtype == torch.uint8
    assert len(cache.layers) == model.num_layers >= 1
    assert cache.seq_len == context >= 1
    rebuilt = cache.paused is not None  # a paused prefill's layer 0 is stored as its token ids
    if rebuilt:  # without the model, layer 0 holds only its positions, every context token's
        ids, first = cache.paused.ids, cache.layers[0]
        assert ids.shape == (cache.seq_len,) and 0 <= int(ids.min()) and int(ids.max()) < model.vocab_size
        assert first.keys.numel() == first.values.numel() == 0
        assert torch.equal(first.positions, torch.arange(cache.seq_len).unsqueeze(0))
    for layer in cache.layers[1 if rebuilt else 0 :]:
        n = layer.length
        assert layer.keys.shape == layer.values.shape == (model.num_kv_heads, n, model.head_dim)
        assert layer.positions.shape == (model.num_kv_heads, n)
        assert str(layer.keys.dtype).removeprefix("torch.") == stored_as
        if n:  # a row may start with empty slots (head-adaptive budgets), never be only them
            empty = layer.positions == EMPTY
            assert not bool(empty[:, -1].any()) and not bool((empty[:, 1:] & ~empty[:, :-1]).any())
            kept = layer.positions[~empty]
            assert 0 <= int(kept.min()) and int(kept.max()) < context
            assert bool((layer.positions[:, 1:] > layer.positions[:, :-1])[~empty[:, :-1]].all())
            assert layer.padded == bool(empty.any())
    if manifest.paused_layer is not None:
        assert cache.paused.hidden.shape == (context, model.hidden_size)
        assert [layer.length for layer in cache.layers] == [
            context if i <= manifest.paused_layer else 0 for i in range(model.num_layers)
        ]
        for layer in cache.layers[1 : manifest.paused_layer + 1]:  # every context token, in order
            assert torch.equal(layer.positions, torch.arange(context).expand(model.num_kv_heads, -1))
    assert read_manifest(path) == manifest
    info = describe_cache(path)
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # encodes like a real terminal would
    Console(file=out, width=120).print(cache_info_view(info))
    json.dumps(info, ensure_ascii=False).encode("utf-8")  # what `cache info --json` prints


def outcome(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    try:
        assert_intact(path, data)
    except CacheFileError as error:
        assert str(error).startswith(f"{path}: ") and "\n" not in str(error), str(error)
        for read in (read_manifest, describe_cache):  # the other readers refuse or succeed, never crash
            try:
                read(path)
            except CacheFileError:
                pass
        return "refused"
    return "loaded"


def test_every_mutant_loads_intact_or_is_refused(sources, tmp_path, record_property):
    rng = random.Random(SEED)
    path = tmp_path / "mutant.fkv"
    counts, crashes = {"loaded": 0, "refused": 0}, []
    for source in sources:  # control: the unmutated files load
        assert outcome(path, source) == "loaded"
    start = time.perf_counter()
    tried = 0
    while tried < MUTANTS and time.perf_counter() - start < DEADLINE_S:
        what, data = mutate(rng, rng.choice(sources))
        tried += 1
        try:
            counts[outcome(path, data)] += 1
        except Exception as error:  # the failure this test exists to find
            crashes.append(f"{what}: {type(error).__name__}: {str(error)[:200]}")
    seconds = time.perf_counter() - start
    summary = f"{tried} mutants in {seconds:.1f} s: {counts['loaded']} loaded intact, {counts['refused']} refused"
    print(f"\ncache loader fuzz: {summary}")
    record_property("mutants", tried)
    assert not crashes, f"{summary}; {len(crashes)} raised something else, e.g.:\n" + "\n".join(crashes[:10])
    assert tried >= 500 and counts["refused"] > tried // 2, summary  # the loop really ran and really broke files
    assert counts["loaded"] > 0, summary  # and some mutants (padding, rehashed edits) stay valid
