"""The storage dtypes a file may name and the quantization scheme a quantized or coded one records."""

import json
from dataclasses import asdict, dataclass, replace

import torch

from core.errors import CacheFileError
from core.storage import coded, rans
from core.storage.fields import NONE, Fields
from core.storage.quant import BITS, CODE_WIDTHS, group_size, hidden_bits, paused_layer_bits

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CODED = "coded"  # int6's rounding error at one step a tensor, entropy-coded (coded.py): query-aware caches only
STORAGE_DTYPES = (*FLOAT_DTYPES, *BITS, CODED)  # what --cache-dtype accepts
GROUPINGS = ("tokens", "channels")  # the dimension a group of key or hidden-state elements runs along


@dataclass(frozen=True)
class Coding:
    """How a coded file is coded, beyond the int6 scheme its steps come from: what this fastkv decodes, and so
    what every file it reads records."""

    coding: str = "rans"
    keys: str = "before_rope"
    span: int = coded.SPAN
    precision: int = rans.PRECISION
    block: int = coded.BLOCK
    lane_tokens: int = coded.LANE_TOKENS

    @classmethod
    def parse(cls, quantization: dict) -> "Coding":
        for key, expected in asdict(cls()).items():
            if quantization.get(key) != expected or type(quantization.get(key)) is not type(expected):
                found = json.dumps(quantization.get(key))[:40]
                raise CacheFileError(
                    f"manifest.quantization.{key} is {found}, not {json.dumps(expected)}: coded in a way this version "
                    "of fastkv does not decode; rebuild it with `fastkv cache build`"
                )
        return cls()


@dataclass(frozen=True)
class Quantization:
    """A quantized file's scheme (core/storage/quant.py): `bits` of the codes, `hidden_bits` of the paused hidden
    states', `layer_bits` of the keys and values of the layers it lists (a paused prefill's), groups of `group_size`
    elements along `key_groups` for keys and `hidden_groups` for the hidden states (the rest along channels),
    float16 scales; a coded file's has its `coding` too."""

    bits: int
    hidden_bits: int
    layer_bits: tuple[int, ...]
    group_size: int
    key_groups: str = "tokens"
    hidden_groups: str = "tokens"
    scale_dtype: str = "float16"
    coding: Coding | None = None

    def to_dict(self) -> dict:
        scheme = {
            "bits": self.bits,
            "hidden_bits": self.hidden_bits,
            "layer_bits": list(self.layer_bits),
            "group_size": self.group_size,
            "key_groups": self.key_groups,
            "hidden_groups": self.hidden_groups,
            "scale_dtype": self.scale_dtype,
        }
        return scheme if self.coding is None else {**scheme, **asdict(self.coding)}

    def tensor_bits(self, name: str) -> int:
        """The bits of a stored tensor's codes: `hidden_bits` for the paused hidden states, `layer_bits` for the
        keys and values of the layers it lists, `bits` for the rest."""
        if name == "paused.hidden":
            return self.hidden_bits
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        return self.layer_bits[layer] if layer is not None and layer < len(self.layer_bits) else self.bits

    def group_dim(self, name: str) -> int:
        """The dimension a stored tensor's groups run along: keys per `key_groups`, the paused hidden states per
        `hidden_groups`, the rest along channels."""
        grouping = (
            self.key_groups if name.endswith(".keys") else self.hidden_groups if name == "paused.hidden" else None
        )
        return -2 if grouping == "tokens" else -1


def quantization_for(dtype: str, model, paused_layer: int | None) -> Quantization | None:
    """The scheme for storing in `dtype` a cache of `model` (a ModelFingerprint, or anything with its `head_dim` and
    `hidden_size`; None: float storage), paused after `paused_layer` (None: not paused)."""
    if dtype == CODED:
        return replace(quantization_for("int6", model, paused_layer), coding=Coding())
    if dtype not in BITS:
        return None
    bits = BITS[dtype]
    layer_bits = () if paused_layer is None else tuple(paused_layer_bits(bits, paused_layer + 1))
    # the residual stream has a few channels a thousand times the rest (Qwen2.5: ~2000 against a median of
    # 0.2): grouped along channels, one of them flattens its whole group; along tokens it has its own scale
    return Quantization(bits, hidden_bits(bits), layer_bits, group_size(model.head_dim, model.hidden_size))


def parse_quantization(manifest: Fields, dtype: str, model, paused: bool) -> Quantization | None:
    """The manifest's `quantization` for the tensors of `model` (its ModelFingerprint) stored in `dtype`, paused or
    not: a quantized dtype's scheme with the dtype's bits, widths of CODE_WIDTHS, a group size dividing every channel
    dimension and float16 scales; a coded one's with the coding this fastkv decodes (query-aware files only); none
    for a float dtype."""
    value = manifest.get("quantization", dict, NONE)
    if dtype == CODED:
        if not paused:
            raise CacheFileError("manifest.dtype is coded, which only query-aware files are")
        coding = Coding.parse(value or {})
        dtype = "int6"  # the steps a coded file rounds to are int6's (quantization_for)
    else:
        coding = None
    if dtype not in BITS:
        if value is not None:
            raise CacheFileError(f"manifest.quantization should be null for {dtype} tensors")
        return None
    if value is None:
        raise CacheFileError(f"manifest.quantization is missing for {dtype} tensors")
    fields = Fields(value, "manifest.quantization")
    scheme = Quantization(
        bits=fields.get("bits", int),
        hidden_bits=fields.get("hidden_bits", int),
        layer_bits=tuple(fields.get("layer_bits", list)),
        group_size=fields.get("group_size", int),
        key_groups=fields.get("key_groups", str),
        hidden_groups=fields.get("hidden_groups", str),
        scale_dtype=fields.get("scale_dtype", str),
        coding=coding,
    )
    check_widths(scheme, dtype, model.num_layers)
    if not {scheme.key_groups, scheme.hidden_groups} <= set(GROUPINGS) or scheme.scale_dtype != "float16":
        raise CacheFileError("manifest.quantization names an unknown grouping or scale dtype")
    group = scheme.group_size
    for key in ("head_dim", "hidden_size"):
        if group < 1 or getattr(model, key) % group:
            raise CacheFileError(
                f"manifest.quantization.group_size {group} does not divide model.{key} {getattr(model, key)}"
            )
    return scheme


def check_widths(scheme: Quantization, dtype: str, num_layers: int) -> None:
    """The codes have the dtype's bits, the hidden states' and each layer's widths are ones the codec packs."""
    if scheme.bits != BITS[dtype]:
        raise CacheFileError(f"manifest.quantization.bits is {scheme.bits}, not {dtype}'s {BITS[dtype]}")
    widths = f"{CODE_WIDTHS[0]} to {CODE_WIDTHS[-1]}"
    if scheme.hidden_bits not in CODE_WIDTHS:
        raise CacheFileError(f"manifest.quantization.hidden_bits is {scheme.hidden_bits}, not {widths}")
    if len(scheme.layer_bits) > num_layers or any(
        type(width) is not int or width not in CODE_WIDTHS for width in scheme.layer_bits
    ):
        raise CacheFileError(f"manifest.quantization.layer_bits should list widths of {widths}, at most one a layer")
