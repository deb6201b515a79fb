"""Group-wise affine int8/int6/int4 quantization of stored cache tensors (DESIGN.md §10), for the quantized codec.

Each group of `group` consecutive elements along one dimension shares a scale and a zero point
(its minimum): x ≈ zero + code * scale, code in [0, 2**bits - 1]. Keys are grouped along tokens
(one scale per channel and group of tokens: KIVI, arXiv 2402.02750, finds key outliers live in
channels); values and queries along channels (one scale per token and group of channels); the paused
hidden states along tokens too (scheme.quantization_for says why). Codes narrower than a byte are packed
as one little-endian bit stream, the first code in the lowest bits: int4 two to a byte, 6-bit codes four
to three bytes. Scales and zero points are float16, rounded so that every element stays inside its
group's range: the rounding error of a code is at most half its group's scale.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

BITS = {"int8": 8, "int6": 6, "int4": 4}
GROUP = 64  # elements per group, at most; the file records the size it used
# the paused hidden states keep more bits than int4: every query recomputes the deeper layers from them, and
# at 4 bits their error changed far more answers than the keys' and values'. 6 is the fewest that kept 90%
# of `ask`'s answers on the tuning half (bench/storage.py; docs/benchmarks.md)
HIDDEN_BITS = 6
CODE_WIDTHS = range(2, 9)  # the widths a file may name for any stored tensor: what pack and unpack handle
PARAM_DTYPE = torch.float16  # scales and zero points


def hidden_bits(bits: int) -> int:
    """The paused hidden states' width in a file of `bits`-bit codes: never fewer than the rest's."""
    return max(bits, HIDDEN_BITS)


def paused_layer_bits(bits: int, layers: int) -> list[int]:
    """The widths of the keys and values of a paused prefill's `layers` layers in a file of `bits`-bit codes.

    Below 8 bits, a bit moves from the first quarter of the layers to the last: quantizing one layer's keys
    or values at 4 bits moved a query's first token most in the layers nearest the pause (tuning half,
    docs/benchmarks.md), and the file keeps its size (the widths average `bits`)."""
    quarter = layers // 4 if bits < 8 else 0
    return [bits - 1] * quarter + [bits] * (layers - 2 * quarter) + [bits + 1] * quarter


@dataclass(frozen=True)
class Quantized:
    """A tensor as stored: `codes` (uint8; below 8 bits packed flat to `stored_numel` bytes), per-group
    `scale` and `zero` in the tensor's shape with the grouped dimension cut to ceil(size / group)."""

    codes: Tensor
    scale: Tensor
    zero: Tensor


def group_size(*dims: int) -> int:
    """The group size for a model: GROUP or the largest power of two dividing every channel dimension."""
    return math.gcd(GROUP, *dims)


def param_shape(shape: tuple[int, ...], group: int, dim: int) -> tuple[int, ...]:
    """Shape of the scales and zero points of a tensor of `shape` grouped along `dim`."""
    dim = dim % len(shape)
    return (*shape[:dim], -(-shape[dim] // group), *shape[dim + 1 :])


def grouped(x: Tensor, group: int, dim: int) -> Tensor:
    """x padded along `dim` with its last element to whole groups, `dim` split in two: [..., groups, group, ...]."""
    dim = dim % x.dim()
    pad = -x.shape[dim] % group
    if pad:
        last = x.narrow(dim, x.shape[dim] - 1, 1)
        x = torch.cat([x, last.expand(*x.shape[:dim], pad, *x.shape[dim + 1 :])], dim=dim)
    return x.reshape(*x.shape[:dim], x.shape[dim] // group, group, *x.shape[dim + 1 :])


def ungrouped(x: Tensor, size: int, dim: int) -> Tensor:
    """Inverse of `grouped` (`dim` of the ungrouped tensor): merge the two dimensions, drop the padding."""
    dim = dim % (x.dim() - 1)
    return x.flatten(dim, dim + 1).narrow(dim, 0, size)


def quantize(x: Tensor, bits: int, group: int, dim: int) -> Quantized:
    """x (any float dtype, not empty along `dim`) -> codes with per-group float16 scale and zero point."""
    dim = dim % x.dim()
    if x.shape[dim] % group and dim == x.dim() - 1:
        raise ValueError(f"group size {group} does not divide the channel dimension {x.shape[dim]}")
    levels = (1 << bits) - 1
    g = grouped(x.float(), group, dim)  # [..., groups, group, ...]
    low, high = g.amin(dim + 1), g.amax(dim + 1)  # [..., groups, ...]
    zero = low.to(PARAM_DTYPE)
    zero = torch.where(zero.float() > low, torch.nextafter(zero, torch.tensor(-math.inf, dtype=PARAM_DTYPE)), zero)
    scale = ((high - zero.float()) / levels).to(PARAM_DTYPE)
    short = zero.float() + scale.float() * levels < high  # rounded down: the top of the range would clip
    scale = torch.where(short, torch.nextafter(scale, torch.tensor(math.inf, dtype=PARAM_DTYPE)), scale)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: any scale, codes 0
    codes = ((g - zero.float().unsqueeze(dim + 1)) / scale.float().unsqueeze(dim + 1)).round_().clamp_(0, levels)
    codes = ungrouped(codes.to(torch.uint8), x.shape[dim], dim)
    return Quantized(pack(codes, bits) if bits < 8 else codes.contiguous(), scale, zero)


def dequantize(q: Quantized, shape: tuple[int, ...], bits: int, group: int, dim: int, dtype: torch.dtype) -> Tensor:
    """The tensor of `shape` that `q` stores, in `dtype` (shapes checked by the caller)."""
    dim = dim % len(shape)
    codes = unpack(q.codes, math.prod(shape), bits).reshape(shape) if bits < 8 else q.codes
    out = torch.empty(shape, dtype=torch.float32)
    whole = shape[dim] // group * group  # whole groups as a view, a short last group apart (no padding copy)
    for start, size in ((0, whole), (whole, shape[dim] - whole)):
        if size:
            first = start // group
            g = codes.narrow(dim, start, size).unflatten(dim, (-1, min(group, size)))  # [..., groups, group, ...]
            scale, zero = (p.narrow(dim, first, g.shape[dim]).float().unsqueeze(dim + 1) for p in (q.scale, q.zero))
            out.narrow(dim, start, size).unflatten(dim, g.shape[dim : dim + 2]).copy_(
                torch.addcmul(zero, g.float(), scale)
            )
    return out.to(dtype)


def packing(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole unit of `bits`-bit codes: (2, 1) for 4 bits, (4, 3) for 6."""
    unit = math.lcm(bits, 8)
    return unit // bits, unit // 8


def overlaps(bits: int):
    """(code j, byte k, shift) for every code of a unit that has bits in byte k: the code's bits start
    `shift` bits above byte k's lowest (negative: below it)."""
    per_unit, unit_bytes = packing(bits)
    for j in range(per_unit):
        for k in range(bits * j // 8, (bits * (j + 1) - 1) // 8 + 1):
            yield j, k, bits * j - 8 * k


def pack(codes: Tensor, bits: int) -> Tensor:
    """`bits`-bit codes (uint8) -> `stored_numel` bytes, the codes as one bit stream, the first lowest.
    uint8 shifts drop what belongs to the next byte."""
    per_unit, unit_bytes = packing(bits)
    flat = codes.reshape(-1)
    if flat.numel() % per_unit:
        flat = torch.cat([flat, flat.new_zeros(per_unit - flat.numel() % per_unit)])
    units = flat.reshape(-1, per_unit)
    packed = units.new_zeros(units.shape[0], unit_bytes)
    for j, k, shift in overlaps(bits):
        packed[:, k] |= units[:, j] << shift if shift >= 0 else units[:, j] >> -shift
    return packed.reshape(-1)


def unpack(packed: Tensor, numel: int, bits: int) -> Tensor:
    """Inverse of `pack` -> `numel` codes, flat."""
    per_unit, unit_bytes = packing(bits)
    units = packed.reshape(-1, unit_bytes)
    codes = units.new_zeros(units.shape[0], per_unit)
    for j, k, shift in overlaps(bits):
        codes[:, j] |= units[:, k] >> shift if shift >= 0 else units[:, k] << -shift
    codes &= (1 << bits) - 1
    return codes.reshape(-1)[:numel]


def stored_numel(numel: int, bits: int) -> int:
    """Elements of the stored codes tensor for `numel` values."""
    per_unit, unit_bytes = packing(bits)
    return -(-numel // per_unit) * unit_bytes
