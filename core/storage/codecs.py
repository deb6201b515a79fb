"""How a file stores a cache's float tensors: float, quantized (int8/int6/int4) or coded, each behind one interface
that gives the scheme, encodes, decodes (checking what it reads) and counts the bytes it stores."""

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from core.errors import CacheFileError, InputError
from core.kvcache import KVCache
from core.storage import coded
from core.storage.layout import (
    cache_from_floats,
    expected_names,
    float_shapes,
    float_tensors,
    index_tensors,
    is_float,
    names_mismatch,
    paused_ids,
)
from core.storage.manifest import Manifest
from core.storage.quant import (
    BITS,
    PARAM_DTYPE,
    Quantized,
    dequantize,
    group_size,
    hidden_bits,
    param_shape,
    quantize,
    stored_numel,
)
from core.storage.scheme import CODED, FLOAT_DTYPES, STORAGE_DTYPES, Quantization, quantization_for

DEQUANTIZED = torch.float32  # a quantized or coded file's tensors as a load first rebuilds them
# a coded file's float tensors that are not coded: the held queries, the empty deeper layers
CODED_FLOATS = torch.float16
CODED_PARTS = ("coded.words", "coded.lengths", "coded.tables", "coded.classes", "coded.centers", "coded.escapes")
CHUNK_BYTES = 64  # per code of the chunk a coded save rounds and counts at a time (int64 codes, offsets, symbols)
BLOCK_BYTES = 4  # per code of the block it codes: int16 symbols and about as many bytes of rANS words


@dataclass(frozen=True)
class Extent:
    """What a cache stores, to count its bytes without its tensors: `slots` key entries (and as many value entries)
    per KV head summed over `layers` layers of `kv_heads` x `head_dim` channels, and the hidden states of `held`
    tokens of `hidden` channels (a paused prefill's; 0: none)."""

    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    slots: int
    held: int = 0

    @property
    def kv_elements(self) -> int:
        return 2 * self.slots * self.kv_heads * self.head_dim

    @property
    def hidden_elements(self) -> int:
        return self.held * self.hidden


class Codec(ABC):
    """One storage dtype: `loaded` is the dtype of the float tensors `decode` gives back."""

    name: str
    loaded: torch.dtype

    def scheme(self, model, paused_layer: int | None) -> Quantization | None:
        """What the manifest records of how the tensors are stored (quantization_for)."""
        return quantization_for(self.name, model, paused_layer)

    @abstractmethod
    def encode(self, cache: KVCache, scheme: Quantization | None, runner=None) -> dict[str, Tensor]:
        """The float tensors a file stores of `cache` (layout.float_tensors), as this dtype stores them."""

    @abstractmethod
    def decode(self, tensors: dict[str, Tensor], manifest: Manifest, runner=None) -> dict[str, Tensor]:
        """A file's tensors -> its float tensors under their names, of dtype `loaded`, positions and token ids as
        they are; CacheFileError naming what does not fit."""

    @abstractmethod
    def stored_bytes(self, extent: Extent) -> int:
        """The bytes this dtype stores of the keys, values and hidden states of `extent` (an upper bound)."""

    def working_bytes(self, extent: Extent) -> int:
        """Memory an encode holds beyond the tensors it is given and returns."""
        return 0


@dataclass(frozen=True)
class FloatCodec(Codec):
    name: str
    loaded: torch.dtype

    def encode(self, cache, scheme=None, runner=None):
        return cast(float_tensors(cache), self.loaded)

    def decode(self, tensors, manifest, runner=None):
        return tensors  # layout checks their names, shapes and dtype

    def stored_bytes(self, extent):
        return (extent.kv_elements + extent.hidden_elements) * self.loaded.itemsize


@dataclass(frozen=True)
class QuantizedCodec(Codec):
    """Each tensor as group-wise affine codes (quant.py) under its own name plus `{name}.scale` and `{name}.zero`."""

    name: str
    loaded: torch.dtype = DEQUANTIZED

    def encode(self, cache, scheme, runner=None):
        tensors = {}
        for name, tensor in float_tensors(cache).items():
            q = quantize(tensor, scheme.tensor_bits(name), scheme.group_size, scheme.group_dim(name))
            for suffix, part in (("", q.codes), (".scale", q.scale), (".zero", q.zero)):
                tensors[name + suffix] = part.contiguous().cpu()
        return tensors

    def decode(self, tensors, manifest, runner=None):
        """Every code, scale and zero point tensor's shape and dtype checked, and that scales are finite and
        positive."""
        scheme = manifest.storage.quantization
        group = scheme.group_size
        floats = expected_names(manifest)
        parts = {name + suffix for name in floats if is_float(name) for suffix in (".scale", ".zero")}
        if set(tensors) != floats | parts:
            raise names_mismatch(manifest)
        result = {name: tensors[name] for name in floats if not is_float(name)}
        for name, shape in float_shapes(tensors, manifest).items():
            dim, bits = scheme.group_dim(name), scheme.tensor_bits(name)
            codes, scale, zero = tensors[name], tensors[name + ".scale"], tensors[name + ".zero"]
            expected = (stored_numel(math.prod(shape), bits),) if bits < 8 else shape
            if codes.dtype != torch.uint8 or tuple(codes.shape) != expected:
                packed = (
                    f"{expected[0]:,} bytes of packed {bits}-bit codes"
                    if bits < 8
                    else f"uint8 codes of shape {list(shape)}"
                )
                raise CacheFileError(f"{name} should hold {packed}, not {codes.dtype} {list(codes.shape)}")
            for part, tensor in ((".scale", scale), (".zero", zero)):
                if tensor.dtype != PARAM_DTYPE or tuple(tensor.shape) != param_shape(shape, group, dim):
                    raise CacheFileError(f"{name}{part} has the wrong shape or dtype for groups of {group}")
                if not bool(tensor.isfinite().all()):
                    raise CacheFileError(f"{name}{part} holds NaN or infinite values")
            if not bool((scale > 0).all()):
                raise CacheFileError(f"{name}.scale holds scales that are not positive")
            result[name] = dequantize(Quantized(codes, scale, zero), shape, bits, group, dim, self.loaded)
        return result

    def stored_bytes(self, extent):
        """Codes, the hidden states' at their own width, plus a float16 scale and zero point per group: values in
        groups of channels; keys and hidden states in groups of tokens per channel, a short last group counted
        whole. About 6% beyond the codes for int8 in groups of 64."""
        bits = BITS[self.name]
        kv_width, group = extent.kv_heads * extent.head_dim, group_size(extent.head_dim, extent.hidden)
        values = extent.slots * kv_width // group
        keys = extent.slots * kv_width // group + extent.layers * kv_width  # at most one short group a layer
        hidden = extent.hidden_elements // group + (extent.hidden if extent.held else 0)
        codes = -(-extent.kv_elements * bits // 8) - (-extent.hidden_elements * hidden_bits(bits) // 8)
        return codes + 2 * PARAM_DTYPE.itemsize * (values + keys + hidden)


@dataclass(frozen=True)
class CodedCodec(Codec):
    """A paused prefill's tensors of every token rounded to one step each, the keys before RoPE, entropy-coded
    together (coded.py); its other float tensors float16."""

    name: str = CODED
    loaded: torch.dtype = DEQUANTIZED

    def encode(self, cache, scheme, runner=None):
        """`runner`: the model whose RoPE the keys are stored without."""
        floats = float_tensors(cache)
        names = coded_names(cache.paused.layer)
        tensors = coded_tensors({name: floats.pop(name) for name in names}, scheme, runner)
        return tensors | cast(floats, CODED_FLOATS)

    def decode(self, tensors, manifest, runner=None):
        """Every part (coded.py) and step checked; RoPE put back on the keys when `runner` is given."""
        return decoded(tensors, manifest, runner)

    def stored_bytes(self, extent):
        """Counted as int6, the bytes it rounds to and, at 5.3 bits a value against 6.5, more than it stores."""
        return QuantizedCodec("int6").stored_bytes(extent)

    def working_bytes(self, extent):
        """The keys and values as float32 [tokens, channels] (the keys turned back from RoPE), a block's symbols and
        words, a chunk's codes."""
        kv = extent.kv_elements
        return (
            torch.float32.itemsize * kv
            + BLOCK_BYTES * min(kv + extent.hidden_elements, coded.BLOCK)
            + CHUNK_BYTES * coded.CHUNK
        )


def cast(floats: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {name: tensor.to(dtype).contiguous().cpu() for name, tensor in floats.items()}


def coded_names(paused_layer: int) -> list[str]:
    """The tensors a coded file codes, in the order of their channels: the keys and values of a paused prefill's
    layers from 1 (layer 0 is rebuilt from the token ids), then the paused hidden states; every context token's."""
    names = [f"layers.{i}.{part}" for i in range(1, paused_layer + 1) for part in ("keys", "values")]
    return [*names, "paused.hidden"]


def tokens_first(name: str, x: Tensor) -> Tensor:
    """A coded tensor's view with its tokens first: keys and values [kv_heads, n, d] as [n, kv_heads, d]."""
    return x if name == "paused.hidden" else x.transpose(0, 1)


def as_columns(name: str, x: Tensor) -> Tensor:
    """A coded tensor as [tokens, channels]: keys and values with kv_heads * d channels."""
    x = tokens_first(name, x)
    return x.reshape(x.shape[0], -1)


def coded_tensors(floats: dict[str, Tensor], scheme: Quantization, runner) -> dict[str, Tensor]:
    """The coded storage of a paused prefill's tensors of every token: one step each (`{name}.step`, int6's
    squared error on the tensor as cached), the keys rounded before RoPE, their channels side by side."""
    parts, tensors = [], {}  # (first channel, [tokens, channels], step) of each tensor
    for name, x in floats.items():
        x = x.float().cpu()
        step = coded.step_for(x, scheme.tensor_bits(name), scheme.group_size, scheme.group_dim(name))
        if name.endswith(".keys"):
            x = runner.rotate_keys(x, inverse=True)
        tensors[f"{name}.step"] = torch.tensor([step], dtype=torch.float32)
        parts.append((parts[-1][0] + parts[-1][1].shape[1] if parts else 0, as_columns(name, x), step))

    def codes(start: int, stop: int) -> Tensor:
        return torch.cat([
            coded.rounded(columns[:, max(start - first, 0) : stop - first], step)
            for first, columns, step in parts
            if first < stop and start < first + columns.shape[1]
        ], 1)  # fmt: skip

    first, columns, _ = parts[-1]
    stored = coded.encode(codes, first + columns.shape[1], len(columns), scheme.coding.lane_tokens)
    tensors.update({part: getattr(stored, part.removeprefix("coded.")).contiguous() for part in CODED_PARTS})
    return tensors


def decoded(tensors: dict[str, Tensor], manifest: Manifest, runner) -> dict[str, Tensor]:
    """A coded file's tensors -> float32 ones under the float names, after checking every part (coded.py) and step;
    RoPE put back on the keys when `runner` is given."""
    names = coded_names(manifest.paused_layer)
    floats = expected_names(manifest)
    if set(tensors) != (floats - set(names)) | {f"{name}.step" for name in names} | set(CODED_PARTS):
        raise names_mismatch(manifest)
    result = {}
    for name in floats - set(names):
        tensor = tensors[name]
        if is_float(name) and tensor.dtype != CODED_FLOATS:
            raise CacheFileError(f"{name} should be float16 in a coded file, not {tensor.dtype}")
        result[name] = tensor.to(DEQUANTIZED) if is_float(name) else tensor
    context = manifest.context_tokens
    paused_ids(tensors, manifest)  # a stored tensor of `context` ids: what bounds the codes decoded
    shapes = float_shapes(tensors, manifest)
    channels = [math.prod(shapes[name]) // context for name in names]
    try:
        steps = [coded.check_step(tensors[f"{name}.step"], name) for name in names]
        stored = coded.Coded(*(tensors[part] for part in CODED_PARTS))
        codes = coded.decode(stored, sum(channels), context, manifest.storage.quantization.coding.lane_tokens)
    except ValueError as error:
        raise CacheFileError(str(error)) from None
    start = 0
    for name, width, step in zip(names, channels, steps, strict=True):
        x = torch.empty(shapes[name], dtype=DEQUANTIZED)
        codes.scaled(start, start + width, step, tokens_first(name, x))
        start += width
        result[name] = runner.rotate_keys(x) if runner is not None and name.endswith(".keys") else x
    return result


CODECS = {
    **{name: FloatCodec(name, dtype) for name, dtype in FLOAT_DTYPES.items()},
    **{name: QuantizedCodec(name) for name in BITS},
    CODED: CodedCodec(),
}


def codec_for(dtype: str | torch.dtype) -> Codec:
    """The codec of a --cache-dtype name (or a float torch dtype), which check_cache_dtype has accepted."""
    if isinstance(dtype, torch.dtype):
        return next(codec for codec in CODECS.values() if isinstance(codec, FloatCodec) and codec.loaded == dtype)
    return CODECS[dtype]


def check_cache_dtype(dtype: str, query_aware: bool = True) -> None:
    if dtype not in STORAGE_DTYPES:
        raise InputError(f"--cache-dtype must be one of {', '.join(STORAGE_DTYPES)}, got '{dtype}'")
    if dtype == CODED and not query_aware:
        raise InputError("--cache-dtype coded stores query-aware caches; pick int6 or another for a question-blind one")


def storage_for(dtype: str | None, query_aware: bool) -> str:
    """--cache-dtype as given, or `cache build`'s default: coded for a query-aware cache, the one that keeps `ask`'s
    answers in a fifth of the float16 fullkv file; int6 for one chosen without the question, which coded storage does
    not hold (its layers keep a subset of the tokens)."""
    return dtype or (CODED if query_aware else "int6")


def cache_tensors(cache: KVCache, dtype: str, scheme: Quantization | None, runner=None) -> dict[str, Tensor]:
    """The tensors a file stores of `cache` in `dtype` with `scheme`: its codec's, then positions and token ids.
    `runner`: the model, which coded storage needs."""
    return codec_for(dtype).encode(cache, scheme, runner) | index_tensors(cache)


def cache_from_tensors(
    tensors: dict[str, Tensor], manifest: Manifest, device="cpu", dtype: torch.dtype | None = None, runner=None
) -> KVCache:
    """The cache that a file's tensors and manifest hold, every tensor checked (CacheFileError naming what does not
    fit), on `device` in `dtype`; `runner` rebuilds a paused prefill's layer 0 and turns a coded file's keys back."""
    codec = codec_for(manifest.storage.dtype)
    return cache_from_floats(codec.decode(tensors, manifest, runner), manifest, codec.loaded, device, dtype, runner)


def stored_bytes(dtype, extent: Extent) -> int:
    """The tensor bytes of a file that stores `extent` in `dtype` (a --cache-dtype name or a float torch dtype):
    int32 positions, or for a paused prefill, which stores none (every token up to its layer, nothing deeper), its
    int32 token ids in place of layer 0; and what the codec stores of the rest."""
    if extent.held:
        positions, extent = 4 * extent.held, replace(extent, slots=extent.slots - extent.held)
    else:
        positions = 4 * extent.kv_heads * extent.slots
    return positions + codec_for(dtype).stored_bytes(extent)
