"""Save and load the compressed cache as one safetensors file (.fkv) with a JSON manifest.

Loading never unpickles: safetensors holds only raw tensors and a string header. Every field of
the manifest is checked, the tensor data is checksummed, and writes are atomic.
See docs/cache-format.md for the format.
"""

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from core import coded, rans
from core.atomic import write_bytes_atomic
from core.errors import CacheFileError, FastKVError, InputError
from core.kvcache import EMPTY, KVCache, LayerKV, Paused, page_coverage
from core.methods import make_method
from core.quant import (
    BITS,
    CODE_WIDTHS,
    PARAM_DTYPE,
    Quantized,
    dequantize,
    group_size,
    hidden_bits,
    param_shape,
    paused_layer_bits,
    quantize,
    stored_numel,
)

FORMAT_VERSION = 12
# version 1 had no query-aware caches and no `paused_layer`; version 2's held no `paused.queries`;
# version 3's were never quantized; version 4's had no empty slots (head-adaptive budgets);
# versions 4 and 5 grouped quantized hidden states along channels, with no `hidden_groups` to say so;
# versions 4 to 6 stored them at the dtype's bits, with no `hidden_bits`; versions up to 7 stored the
# positions of a paused prefill's layers, which are every context token in order; versions 4 to 8 stored
# every layer's keys and values at the dtype's bits, with no `layer_bits`; version 9 had no int6; versions up
# to 10 stored a paused prefill's layer 0 keys and values, which version 11 rebuilds from the token ids; version 11
# had no coded storage
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)
MANIFEST_KEY = "fastkv.manifest"
CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CODED = "coded"  # int6's rounding error at one step a tensor, entropy-coded (core/coded.py): query-aware caches only
STORAGE_DTYPES = (*CACHE_DTYPES, *BITS, CODED)  # what --cache-dtype accepts
CODED_PARTS = ("coded.words", "coded.lengths", "coded.tables", "coded.classes", "coded.centers", "coded.escapes")
CODED_FLOATS = torch.float16  # a coded file's tensors that are not coded: the held queries, the empty deeper layers
CODING = {  # how a coded file is coded, beyond int6's scheme its steps come from and its `lane_tokens`
    "coding": "rans",
    "keys": "before_rope",
    "span": coded.SPAN,
    "precision": rans.PRECISION,
    "block": coded.BLOCK,
}
GROUPINGS = ("tokens", "channels")  # the dimension a group of key or hidden-state elements runs along
DEQUANTIZED = torch.float32  # a quantized file's tensors as load_cache first rebuilds them

# field -> type, or a nested schema; lists of dicts give the schema of one element.
MANIFEST_SCHEMA = {
    "format_version": int,
    "fastkv_version": str,
    "created": str,
    "model": {
        "name": str,
        "spec": (str, type(None)),
        "model_type": str,
        "num_layers": int,
        "num_heads": int,
        "num_kv_heads": int,
        "head_dim": int,
        "hidden_size": int,
        "vocab_size": int,
        "weights_sha256": str,
    },
    "tokenizer_sha256": str,
    "method": {"name": str, "parameters": dict},
    "query_budget": (str, type(None)),
    "steering_questions": int,
    "paused_layer": (int, type(None)),
    "policy": (dict, type(None)),  # the method's settings in tokens for this context; from version 3
    "quantization": (dict, type(None)),  # from version 4: null for float storage
    "context_tokens": int,
    "dropped_tokens": int,
    "template": {"question_prefix": str, "tail": str},
    "documents": [{"name": str, "size": int, "sha256": str, "pages": int, "tokens": int, "page_token_spans": list}],
    "dtype": str,
    "tensors_sha256": str,
}


def check_manifest(value, schema=MANIFEST_SCHEMA, where: str = "manifest") -> None:
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise CacheFileError(f"{where} should be an object")
        for key, field_schema in schema.items():
            if key not in value:
                raise CacheFileError(f"{where}.{key} is missing")
            check_manifest(value[key], field_schema, f"{where}.{key}")
    elif isinstance(schema, list):
        if not isinstance(value, list):
            raise CacheFileError(f"{where} should be a list")
        for i, item in enumerate(value):
            check_manifest(item, schema[0], f"{where}[{i}]")
    elif not isinstance(value, schema) or (isinstance(value, bool) and schema is int):
        expected = " or ".join(t.__name__ for t in schema) if isinstance(schema, tuple) else schema.__name__
        raise CacheFileError(f"{where} should be {expected}, not {type(value).__name__}")


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_tensors(cache: KVCache, dtype: str, quantization: dict | None = None, model=None) -> dict[str, torch.Tensor]:
    """The tensors to store: float ones cast to `dtype`, or, with `quantization`, each as its codes
    under its own name plus `{name}.scale` and `{name}.zero`; coded ones as `coded_tensors` writes them
    (`model`: the Runner, whose RoPE they are stored without)."""
    floats = {}
    for i, layer in enumerate(cache.layers):
        if i == 0 and cache.paused is not None:
            continue  # rebuilt from the token ids (Runner.first_layer)
        floats[f"layers.{i}.keys"] = layer.keys
        floats[f"layers.{i}.values"] = layer.values
    if cache.paused is not None:
        floats["paused.hidden"] = cache.paused.hidden
        if cache.paused.queries is not None:
            floats["paused.queries"] = cache.paused.queries
    tensors = {}
    if dtype == CODED:
        tensors = coded_tensors(
            {name: floats.pop(name) for name in coded_names(cache.paused.layer)}, quantization, model
        )
    for name, tensor in floats.items():
        if quantization is None or dtype == CODED:
            tensors[name] = tensor.to(CACHE_DTYPES.get(dtype, CODED_FLOATS)).contiguous().cpu()
            continue
        q = quantize(tensor, tensor_bits(name, quantization), quantization["group_size"], group_dim(name, quantization))
        for suffix, part in (("", q.codes), (".scale", q.scale), (".zero", q.zero)):
            tensors[name + suffix] = part.contiguous().cpu()
    paused_layer = None if cache.paused is None else cache.paused.layer
    for i, layer in enumerate(cache.layers):
        if not caches_every_token(paused_layer, i):
            tensors[f"layers.{i}.positions"] = layer.positions.to(torch.int32).contiguous().cpu()
    if cache.paused is not None:
        tensors["paused.ids"] = cache.paused.ids[: cache.seq_len].to(torch.int32).contiguous().cpu()
    return tensors


def coded_names(paused_layer: int) -> list[str]:
    """The tensors a coded file codes, in the order of their channels: the keys and values of a paused prefill's
    layers from 1 (layer 0 is rebuilt from the token ids), then the paused hidden states; every context token's."""
    names = [f"layers.{i}.{part}" for i in range(1, paused_layer + 1) for part in ("keys", "values")]
    return [*names, "paused.hidden"]


def tokens_first(name: str, x: torch.Tensor) -> torch.Tensor:
    """A coded tensor's view with its tokens first: keys and values [kv_heads, n, d] as [n, kv_heads, d]."""
    return x if name == "paused.hidden" else x.transpose(0, 1)


def as_columns(name: str, x: torch.Tensor) -> torch.Tensor:
    """A coded tensor as [tokens, channels]: keys and values with kv_heads * d channels."""
    x = tokens_first(name, x)
    return x.reshape(x.shape[0], -1)


def coded_tensors(floats: dict[str, torch.Tensor], quantization: dict, model) -> dict[str, torch.Tensor]:
    """The coded storage of a paused prefill's tensors of every token: one step each (`{name}.step`, int6's
    squared error on the tensor as cached), the keys rounded before RoPE, their channels side by side."""
    parts, tensors = [], {}  # (first channel, [tokens, channels], step) of each tensor
    for name, x in floats.items():
        x = x.float().cpu()
        step = coded.step_for(
            x, tensor_bits(name, quantization), quantization["group_size"], group_dim(name, quantization)
        )
        if name.endswith(".keys"):
            x = model.rotate_keys(x, inverse=True)
        tensors[f"{name}.step"] = torch.tensor([step], dtype=torch.float32)
        parts.append((parts[-1][0] + parts[-1][1].shape[1] if parts else 0, as_columns(name, x), step))

    def codes(start: int, stop: int) -> torch.Tensor:
        return torch.cat([
            coded.rounded(columns[:, max(start - first, 0) : stop - first], step)
            for first, columns, step in parts
            if first < stop and start < first + columns.shape[1]
        ], 1)  # fmt: skip

    first, columns, _ = parts[-1]
    stored = coded.encode(codes, first + columns.shape[1], len(columns))
    tensors.update({part: getattr(stored, part.removeprefix("coded.")).contiguous() for part in CODED_PARTS})
    return tensors


def caches_every_token(paused_layer: int | None, layer: int) -> bool:
    """Whether `layer` holds every context token in order, its positions 0..n-1: a paused prefill's
    layers up to the paused one. From version 8 a file does not store those positions."""
    return paused_layer is not None and layer <= paused_layer


def stores_positions(manifest: dict, layer: int) -> bool:
    return manifest["format_version"] < 8 or not caches_every_token(manifest["paused_layer"], layer)


def rebuilds_first_layer(manifest: dict) -> bool:
    """Whether a file holds a paused prefill's token ids (`paused.ids`) in place of its layer 0 keys and values."""
    return manifest["format_version"] >= 11 and manifest["paused_layer"] is not None


def stored_layers(manifest: dict) -> range:
    """The layers whose keys and values a file holds."""
    return range(1 if rebuilds_first_layer(manifest) else 0, manifest["model"]["num_layers"])


def quantizable(name: str) -> bool:
    """Whether a stored tensor is quantized in a quantized file: all but positions and token ids."""
    return not name.endswith(".positions") and name != "paused.ids"


def group_dim(name: str, quantization: dict) -> int:
    """The dimension a stored tensor's groups run along: keys per `key_groups`, the paused hidden states
    per `hidden_groups`, the rest along channels."""
    grouping = "key_groups" if name.endswith(".keys") else "hidden_groups" if name == "paused.hidden" else None
    return -2 if grouping is not None and quantization[grouping] == "tokens" else -1


def tensor_bits(name: str, quantization: dict) -> int:
    """The bits of a stored tensor's codes: `hidden_bits` for the paused hidden states, `layer_bits` for the
    keys and values of the layers it lists (a paused prefill's), `bits` for the rest."""
    if name == "paused.hidden":
        return quantization["hidden_bits"]
    widths, layer = quantization["layer_bits"], int(name.split(".")[1]) if name.startswith("layers.") else None
    return widths[layer] if layer is not None and layer < len(widths) else quantization["bits"]


def quantization_for(dtype: str, model: dict, paused_layer: int | None) -> dict | None:
    """The manifest's `quantization` for storing a cache of `model` in `dtype` (None: float storage), paused
    after `paused_layer` (None: not paused)."""
    if dtype == CODED:
        return {**quantization_for("int6", model, paused_layer), **CODING, "lane_tokens": coded.LANE_TOKENS}
    if dtype not in BITS:
        return None
    group = group_size(model["head_dim"], model["hidden_size"])
    # the residual stream has a few channels a thousand times the rest (Qwen2.5: ~2000 against a median of
    # 0.2): grouped along channels, one of them flattens its whole group; along tokens it has its own scale
    groupings = {"key_groups": "tokens", "hidden_groups": "tokens"}
    bits = BITS[dtype]
    layer_bits = [] if paused_layer is None else paused_layer_bits(bits, paused_layer + 1)
    widths = {"bits": bits, "hidden_bits": hidden_bits(bits), "layer_bits": layer_bits}
    return {**widths, "group_size": group, **groupings, "scale_dtype": "float16"}


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


def storage_for(dtype: str | None, query_aware: bool) -> str:
    """--cache-dtype as given, or `cache build`'s default (#13): coded for a query-aware cache, the one that keeps
    `ask`'s answers in a fifth of the float16 fullkv file; int6 for one chosen without the question, which coded
    storage does not hold (its layers keep a subset of the tokens)."""
    return dtype or (CODED if query_aware else "int6")


def check_cache_dtype(dtype: str, query_aware: bool = True) -> None:
    if dtype not in STORAGE_DTYPES:
        raise InputError(f"--cache-dtype must be one of {', '.join(STORAGE_DTYPES)}, got '{dtype}'")
    if dtype == CODED and not query_aware:
        raise InputError("--cache-dtype coded stores query-aware caches; pick int6 or another for a question-blind one")


def save_cache(
    path: Path, cache: KVCache, manifest: dict, dtype: str = "float16", force: bool = False, model=None
) -> int:
    """Write `cache` and `manifest` to `path` atomically; returns the file size in bytes. `model` (the Runner)
    is needed for coded storage."""
    check_cache_dtype(dtype, cache.paused is not None)
    check_target(path, force)
    quantization = quantization_for(dtype, manifest["model"], manifest["paused_layer"])
    tensors = cache_tensors(cache, dtype, quantization, model)
    manifest = {
        **manifest,
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "quantization": quantization,
        "tensors_sha256": tensors_sha256(tensors),
    }
    check_manifest(manifest)
    data = save(tensors, metadata={MANIFEST_KEY: json.dumps(manifest)})
    try:
        write_bytes_atomic(path, data, overwrite=force)
    except FileExistsError:  # another process wrote it since check_target
        raise InputError(f"{path}: exists; pass --force to overwrite it") from None
    except OSError as error:  # a full disk, a directory made read-only meanwhile, ...
        raise FastKVError(f"{path}: cannot write the cache ({error.strerror or error})") from None
    return len(data)


def read_manifest(path: Path) -> dict:
    """The manifest alone (for `cache info` and compatibility checks), validated."""
    with open_cache(path) as f:
        return parse_manifest(path, f.metadata())


def load_cache(
    path: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, model=None
) -> tuple[KVCache, dict]:
    """Load and verify a .fkv file -> (cache on `device` in `dtype`, manifest). `model` (the Runner) rebuilds
    layer 0 of a query-aware cache from its token ids and puts RoPE back on a coded file's keys; without it
    (`cache info`) that layer holds only its positions and coded keys stay as stored."""
    with open_cache(path) as f:
        manifest = parse_manifest(path, f.metadata())
        try:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as error:  # safetensors raises its own error types on damaged data
            raise CacheFileError(f"{path}: damaged tensor data ({error})") from None
    if tensors_sha256(tensors) != manifest["tensors_sha256"]:
        raise CacheFileError(f"{path}: tensor data does not match its checksum (the file was damaged or modified)")
    return cache_from_tensors(path, tensors, manifest, device, dtype, model), manifest


def cache_from_tensors(
    path: Path, tensors: dict[str, torch.Tensor], manifest: dict, device, dtype, model=None
) -> KVCache:
    """The cache that a file's tensors and manifest hold, checked as load_cache checks it."""
    if manifest["dtype"] == CODED:
        tensors = decoded(path, tensors, manifest, model)
    elif manifest["quantization"] is not None:
        tensors = dequantized(path, tensors, manifest)
    layers = [layer.to(device, dtype) for layer in layers_from_tensors(path, tensors, manifest)]
    ids = paused_ids(path, tensors, manifest)
    if ids is not None:  # layer 0 of a version 11 query-aware file
        ids = ids.to(device)
        layers.insert(0, unbuilt_first_layer(ids) if model is None else model.first_layer(ids))
    paused = paused_from_tensors(path, tensors, layers, manifest, ids)
    return KVCache(layers, manifest["context_tokens"], None if paused is None else paused.to(device, dtype))


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


def parse_manifest(path: Path, metadata: dict | None) -> dict:
    if not metadata or MANIFEST_KEY not in metadata:
        raise CacheFileError(f"{path}: a safetensors file, but not a fastkv cache (no manifest)")
    try:
        manifest = json.loads(metadata[MANIFEST_KEY])
    except (ValueError, RecursionError):  # ValueError: bad JSON, or an int of more than 4,300 digits
        raise CacheFileError(f"{path}: the manifest is not valid JSON") from None
    try:
        json.dumps(manifest, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # "\udcff" escapes: valid JSON, but not text that can be printed
        raise CacheFileError(f"{path}: the manifest holds invalid Unicode text") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        readable = " and ".join(map(str, READABLE_VERSIONS))
        raise CacheFileError(f"{path}: cache format version {version!r}; this fastkv reads versions {readable}")
    if version == 1:
        manifest["paused_layer"] = None
    if version in (1, 2):
        manifest["policy"] = None
    if version in (1, 2, 3):
        manifest["quantization"] = None
    if version in (4, 5) and isinstance(manifest.get("quantization"), dict):
        manifest["quantization"]["hidden_groups"] = "channels"
    if version in (4, 5, 6) and isinstance(manifest.get("quantization"), dict):
        manifest["quantization"]["hidden_bits"] = manifest["quantization"].get("bits")
    if version in (4, 5, 6, 7, 8) and isinstance(manifest.get("quantization"), dict):
        manifest["quantization"]["layer_bits"] = []
    try:
        check_manifest(manifest)
    except CacheFileError as error:
        raise CacheFileError(f"{path}: {error}") from None
    if manifest["dtype"] not in STORAGE_DTYPES:
        raise CacheFileError(f"{path}: unknown tensor dtype {manifest['dtype']!r} in the manifest")
    try:
        check_values(manifest)
        check_quantization(manifest)
    except CacheFileError as error:
        raise CacheFileError(f"{path}: {error}") from None
    return manifest


def check_resumable(manifest: dict) -> None:
    """A query-aware cache names a method that pauses at `paused_layer`, with settings it accepts."""
    method, layer = manifest["method"], manifest["paused_layer"]
    if "budget" not in method["parameters"]:  # each query resumes at this budget unless told another
        raise CacheFileError("manifest.method.parameters.budget is missing from a query-aware cache")
    try:
        pauses_at = make_method(method["name"], **method["parameters"]).pause_layer(manifest["model"]["num_layers"])
    except (FastKVError, TypeError, ValueError):
        pauses_at = None
    if pauses_at != layer:
        raise CacheFileError(
            f"manifest.paused_layer {layer} is not where --method {method['name']!r} with its parameters resumes"
        )


def resumed_method(manifest: dict):
    """The method each query of a query-aware cache resumes with (check_resumable has made it once)."""
    return make_method(manifest["method"]["name"], **manifest["method"]["parameters"])


POLICY_COUNTS = ("budget_tokens", "propagated_tokens", "tsp_layer")


def check_policy(policy: dict | None) -> None:
    """The resolved policy's counts are whole numbers, its window a number of tokens or null (the question's)."""
    for key, value in (policy or {}).items():
        count = type(value) is int and value >= 0
        if key in POLICY_COUNTS and not count or key == "window" and not (value is None or count and value >= 1):
            raise CacheFileError(f"manifest.policy.{key} should be a token count, not {str(value)[:40]!r}")


def check_values(manifest: dict) -> None:
    """Sizes are positive, counts not negative, and page spans are [start, end) pairs inside the context."""
    for key in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "vocab_size"):
        if manifest["model"][key] < 1:
            raise CacheFileError(f"manifest.model.{key} should be at least 1, not {manifest['model'][key]}")
    if not 1 <= manifest["context_tokens"] < 2**31:  # positions are int32
        raise CacheFileError(
            f"manifest.context_tokens should be 1 to 2**31 - 1, not {str(manifest['context_tokens'])[:40]}"
        )
    for key in ("dropped_tokens", "steering_questions"):
        if manifest[key] < 0:
            raise CacheFileError(f"manifest.{key} should not be negative, not {manifest[key]}")
    if manifest["paused_layer"] is not None:
        check_resumable(manifest)
    check_policy(manifest["policy"])
    for i, document in enumerate(manifest["documents"]):
        where = f"manifest.documents[{i}]"
        if min(document["size"], document["pages"], document["tokens"]) < 0:
            raise CacheFileError(f"{where} has a negative size, page or token count")
        spans = document["page_token_spans"]
        if len(spans) != document["pages"]:
            raise CacheFileError(f"{where}.page_token_spans should have one span per page")
        for span in spans:
            if not (
                isinstance(span, list)
                and len(span) == 2
                and all(type(end) is int for end in span)
                and 0 <= span[0] <= span[1] <= manifest["context_tokens"]
            ):
                raise CacheFileError(f"{where}.page_token_spans holds {str(span)[:40]}, not a [start, end) span")


def check_quantization(manifest: dict) -> None:
    """A quantized dtype comes with its scheme: bits of the dtype, a group size dividing every channel
    dimension, float16 scales; a float dtype with none."""
    quantization, dtype, model = manifest["quantization"], manifest["dtype"], manifest["model"]
    if dtype == CODED:
        check_coding(manifest)
        dtype = "int6"  # the steps a coded file rounds to are int6's (quantization_for)
    if dtype not in BITS:
        if quantization is not None:
            raise CacheFileError(f"manifest.quantization should be null for {dtype} tensors")
        return
    if quantization is None:
        raise CacheFileError(f"manifest.quantization is missing for {dtype} tensors")
    schema = {
        "bits": int,
        "hidden_bits": int,
        "layer_bits": list,
        "group_size": int,
        "key_groups": str,
        "hidden_groups": str,
        "scale_dtype": str,
    }
    check_manifest(quantization, schema, "manifest.quantization")
    if quantization["bits"] != BITS[dtype]:
        raise CacheFileError(f"manifest.quantization.bits is {quantization['bits']}, not {dtype}'s {BITS[dtype]}")
    widths = f"{CODE_WIDTHS[0]} to {CODE_WIDTHS[-1]}"
    if quantization["hidden_bits"] not in CODE_WIDTHS:
        raise CacheFileError(f"manifest.quantization.hidden_bits is {quantization['hidden_bits']}, not {widths}")
    layer_bits = quantization["layer_bits"]
    if len(layer_bits) > model["num_layers"] or any(
        type(width) is not int or width not in CODE_WIDTHS for width in layer_bits
    ):
        raise CacheFileError(f"manifest.quantization.layer_bits should list widths of {widths}, at most one a layer")
    groupings = (quantization["key_groups"], quantization["hidden_groups"])
    if not set(groupings) <= set(GROUPINGS) or quantization["scale_dtype"] != "float16":
        raise CacheFileError("manifest.quantization names an unknown grouping or scale dtype")
    group = quantization["group_size"]
    for key in ("head_dim", "hidden_size"):
        if group < 1 or model[key] % group:
            raise CacheFileError(f"manifest.quantization.group_size {group} does not divide model.{key} {model[key]}")


def check_coding(manifest: dict) -> None:
    """A coded file is a version 12 query-aware one, coded as this version of fastkv decodes."""
    if manifest["format_version"] < 12 or manifest["paused_layer"] is None:
        raise CacheFileError("manifest.dtype is coded, which only version 12 query-aware files are")
    quantization = manifest["quantization"] or {}
    lane_tokens = quantization.get("lane_tokens")
    if not (type(lane_tokens) is int and lane_tokens in coded.LANE_TOKENS_READ):
        raise CacheFileError(
            f"manifest.quantization.lane_tokens is {json.dumps(lane_tokens)[:40]}, not a power of two from "
            f"{coded.LANE_TOKENS_READ[0]} to {coded.LANE_TOKENS_READ[-1]}"
        )
    for key, expected in CODING.items():
        if quantization.get(key) != expected:
            found = json.dumps(quantization.get(key))[:40]
            raise CacheFileError(
                f"manifest.quantization.{key} is {found}, not {json.dumps(expected)}: coded in a way this version "
                "of fastkv does not decode"
            )


def expected_names(manifest: dict) -> set[str]:
    """The float tensors' and positions' names a file of this manifest holds."""
    model = manifest["model"]
    names = {f"layers.{i}.{part}" for i in stored_layers(manifest) for part in ("keys", "values")}
    names |= {f"layers.{i}.positions" for i in range(model["num_layers"]) if stores_positions(manifest, i)}
    if manifest["paused_layer"] is not None:
        names.add("paused.hidden")
        if rebuilds_first_layer(manifest):
            names.add("paused.ids")
        if manifest["format_version"] >= 3 and resumed_method(manifest).window is not None:
            names.add("paused.queries")
    return names


def names_mismatch(path: Path, manifest: dict) -> CacheFileError:
    paused = "" if manifest["paused_layer"] is None else " and a paused prefill"
    return CacheFileError(
        f"{path}: the tensors do not match the model's {manifest['model']['num_layers']} layers{paused}"
    )


def float_shapes(path: Path, tensors: dict[str, torch.Tensor], manifest: dict) -> dict[str, tuple[int, ...]]:
    """The shape each quantized tensor stands for, from the positions and the manifest."""
    model, context = manifest["model"], manifest["context_tokens"]
    shapes = {}
    for i in stored_layers(manifest):
        positions = tensors.get(f"layers.{i}.positions")
        if positions is not None and (positions.dim() != 2 or positions.shape[0] != model["num_kv_heads"]):
            raise CacheFileError(f"{path}: layer {i} has tensors of the wrong shape")
        tokens = context if positions is None else positions.shape[1]
        shape = (model["num_kv_heads"], tokens, model["head_dim"])
        shapes[f"layers.{i}.keys"] = shapes[f"layers.{i}.values"] = shape
    if manifest["paused_layer"] is not None:
        shapes["paused.hidden"] = (context, model["hidden_size"])
    if "paused.queries" in tensors:
        window = min(resumed_method(manifest).window, context)
        shapes["paused.queries"] = (manifest["paused_layer"] + 1, model["num_heads"], window, model["head_dim"])
    return shapes


def dequantized(path: Path, tensors: dict[str, torch.Tensor], manifest: dict) -> dict[str, torch.Tensor]:
    """A quantized file's tensors -> float32 ones under the float names, after checking every code,
    scale and zero point tensor's shape and dtype and that scales are finite and positive."""
    quantization = manifest["quantization"]
    group = quantization["group_size"]
    floats = expected_names(manifest)
    parts = {name + suffix for name in floats if quantizable(name) for suffix in (".scale", ".zero")}
    if set(tensors) != floats | parts:
        raise names_mismatch(path, manifest)
    result = {name: tensors[name] for name in floats if not quantizable(name)}
    for name, shape in float_shapes(path, tensors, manifest).items():
        dim, bits = group_dim(name, quantization), tensor_bits(name, quantization)
        codes, scale, zero = tensors[name], tensors[name + ".scale"], tensors[name + ".zero"]
        expected = (stored_numel(math.prod(shape), bits),) if bits < 8 else shape
        if codes.dtype != torch.uint8 or tuple(codes.shape) != expected:
            packed = (
                f"{expected[0]:,} bytes of packed {bits}-bit codes"
                if bits < 8
                else f"uint8 codes of shape {list(shape)}"
            )
            raise CacheFileError(f"{path}: {name} should hold {packed}, not {codes.dtype} {list(codes.shape)}")
        for part, tensor in ((".scale", scale), (".zero", zero)):
            if tensor.dtype != PARAM_DTYPE or tuple(tensor.shape) != param_shape(shape, group, dim):
                raise CacheFileError(f"{path}: {name}{part} has the wrong shape or dtype for groups of {group}")
            if not bool(tensor.isfinite().all()):
                raise CacheFileError(f"{path}: {name}{part} holds NaN or infinite values")
        if not bool((scale > 0).all()):
            raise CacheFileError(f"{path}: {name}.scale holds scales that are not positive")
        result[name] = dequantize(Quantized(codes, scale, zero), shape, bits, group, dim, DEQUANTIZED)
    return result


def decoded(path: Path, tensors: dict[str, torch.Tensor], manifest: dict, model) -> dict[str, torch.Tensor]:
    """A coded file's tensors -> float32 ones under the float names, after checking every part (core/coded.py)
    and step; RoPE put back on the keys when `model` is given."""
    names = coded_names(manifest["paused_layer"])
    floats = expected_names(manifest)
    if set(tensors) != (floats - set(names)) | {f"{name}.step" for name in names} | set(CODED_PARTS):
        raise names_mismatch(path, manifest)
    result = {}
    for name in floats - set(names):
        tensor = tensors[name]
        if quantizable(name) and tensor.dtype != CODED_FLOATS:
            raise CacheFileError(f"{path}: {name} should be float16 in a coded file, not {tensor.dtype}")
        result[name] = tensor.to(DEQUANTIZED) if quantizable(name) else tensor
    context = manifest["context_tokens"]
    paused_ids(path, tensors, manifest)  # a stored tensor of `context` ids: what bounds the codes decoded
    shapes = float_shapes(path, tensors, manifest)
    channels = [math.prod(shapes[name]) // context for name in names]
    try:
        steps = [coded.check_step(tensors[f"{name}.step"], name) for name in names]
        stored = coded.Coded(*(tensors[part] for part in CODED_PARTS))
        codes = coded.decode(stored, sum(channels), context, manifest["quantization"]["lane_tokens"])
    except ValueError as error:
        raise CacheFileError(f"{path}: {error}") from None
    start = 0
    for name, width, step in zip(names, channels, steps, strict=True):
        x = torch.empty(shapes[name], dtype=DEQUANTIZED)
        codes.scaled(start, start + width, step, tokens_first(name, x))
        start += width
        result[name] = model.rotate_keys(x) if model is not None and name.endswith(".keys") else x
    return result


def layers_from_tensors(path: Path, tensors: dict[str, torch.Tensor], manifest: dict) -> list[LayerKV]:
    model = manifest["model"]
    if set(tensors) != expected_names(manifest):
        raise names_mismatch(path, manifest)
    stored = CACHE_DTYPES.get(manifest["dtype"], DEQUANTIZED)
    layers = []
    for i in stored_layers(manifest):
        keys, values = tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"]
        n = keys.shape[1] if keys.dim() == 3 else -1
        expected = (model["num_kv_heads"], n, model["head_dim"])
        # every size is checked against the stored tensors before anything is built from the manifest's counts,
        # which may be any integer
        if stores_positions(manifest, i):
            positions = tensors[f"layers.{i}.positions"]
            shaped = tuple(positions.shape) == expected[:2]
        else:  # every context token, in order
            positions, shaped = None, n == manifest["context_tokens"]
        if tuple(keys.shape) != expected or tuple(values.shape) != expected or not shaped:
            raise CacheFileError(f"{path}: layer {i} has tensors of the wrong shape")
        if positions is None:
            positions = torch.arange(n, dtype=torch.int32).repeat(model["num_kv_heads"], 1)
        if positions.dtype != torch.int32 or keys.dtype != stored or values.dtype != stored:
            raise CacheFileError(f"{path}: layer {i} has tensors of the wrong dtype")
        lowest = EMPTY if manifest["format_version"] >= 5 else 0
        if n and (positions.min() < lowest or positions.max() >= manifest["context_tokens"]):
            raise CacheFileError(f"{path}: layer {i} has positions outside the context")
        empty = positions == EMPTY
        # empty slots (head-adaptive budgets) only start a row, and a head keeps some token
        if (empty[:, 1:] & ~empty[:, :-1]).any() or (n and empty[:, -1].any()):
            raise CacheFileError(f"{path}: layer {i} has empty slots after its tokens")
        if not (positions[:, 1:] > positions[:, :-1])[~empty[:, :-1]].all():
            raise CacheFileError(f"{path}: layer {i} has positions out of order")
        layers.append(LayerKV(keys, values, positions, padded=bool(empty.any())))
    return layers


def unbuilt_first_layer(ids: torch.Tensor) -> LayerKV:
    """Layer 0 of a version 11 query-aware file loaded without the model (`cache info`): every context token's
    position in one row, and no key or value channels, so nothing can attend to it by mistake."""
    empty = torch.empty(1, len(ids), 0, device=ids.device)
    return LayerKV(empty, empty, torch.arange(len(ids), device=ids.device).unsqueeze(0))


def paused_ids(path: Path, tensors: dict[str, torch.Tensor], manifest: dict) -> torch.Tensor | None:
    """A version 11 query-aware file's context token ids (int64), checked against the context and the vocabulary."""
    ids = tensors.get("paused.ids")
    if ids is None:
        return None
    if ids.dtype != torch.int32 or tuple(ids.shape) != (manifest["context_tokens"],):
        raise CacheFileError(f"{path}: paused.ids should hold {manifest['context_tokens']:,} int32 token ids")
    vocabulary = manifest["model"]["vocab_size"]
    if ids.min() < 0 or ids.max() >= vocabulary:
        raise CacheFileError(f"{path}: paused.ids holds token ids outside the model's vocabulary of {vocabulary:,}")
    return ids.long()


def paused_from_tensors(
    path: Path, tensors: dict[str, torch.Tensor], layers: list[LayerKV], manifest: dict, ids: torch.Tensor | None
):
    """A query-aware cache's paused prefill: every context token cached, in order, up to `paused_layer`,
    nothing deeper, and one hidden state per context token."""
    layer = manifest["paused_layer"]
    if layer is None:
        return None
    context = manifest["context_tokens"]
    hidden = tensors["paused.hidden"]
    if tuple(hidden.shape) != (context, manifest["model"]["hidden_size"]):
        raise CacheFileError(f"{path}: the paused hidden states have the wrong shape")
    if hidden.dtype != CACHE_DTYPES.get(manifest["dtype"], DEQUANTIZED):
        raise CacheFileError(f"{path}: the paused hidden states have the wrong dtype")
    queries = tensors.get("paused.queries")  # absent from version 2 files: a resume scores with the question alone
    if queries is not None:
        model, window = manifest["model"], resumed_method(manifest).window
        if tuple(queries.shape) != (layer + 1, model["num_heads"], min(window, context), model["head_dim"]):
            raise CacheFileError(f"{path}: the paused queries have the wrong shape")
        if queries.dtype != hidden.dtype:
            raise CacheFileError(f"{path}: the paused queries have the wrong dtype")
    every = torch.arange(context, dtype=torch.int32)
    for i, cached in enumerate(layers):
        if i <= layer and not (cached.length == context and bool((cached.positions.cpu() == every).all())):
            raise CacheFileError(f"{path}: layer {i} of a paused prefill does not cache every context token")
        if i > layer and cached.length:
            raise CacheFileError(f"{path}: layer {i} is past the paused layer {layer} but caches tokens")
    return Paused(layer, hidden, queries, ids)


def describe_cache(path: Path) -> dict:
    """What `cache info` shows: the verified manifest, sizes, and per-page share of kept tokens."""
    cache, manifest = load_cache(path)
    return {
        "file": str(path),
        "file_bytes": path.stat().st_size,
        "manifest": manifest,
        "kept_tokens_per_layer": cache.kept_tokens_per_layer,
        "paused_bytes": 0 if cache.paused is None else cache.paused.nbytes,
        "page_coverage": [page_coverage(cache, document["page_token_spans"]) for document in manifest["documents"]],
    }
