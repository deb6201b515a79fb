"""Group-wise affine int8/int4 quantization of stored cache tensors (DESIGN.md §10), for store.py.

Each group of `group` consecutive elements along one dimension shares a scale and a zero point
(its minimum): x ≈ zero + code * scale, code in [0, 2**bits - 1]. Keys are grouped along tokens
(one scale per channel and group of tokens: KIVI, arXiv 2402.02750, finds key outliers live in
channels); values, hidden states and queries along channels (one scale per token and group of
channels). int4 codes are packed two to a byte, the first in the low nibble. Scales and zero points
are float16, rounded so that every element stays inside its group's range: the rounding error of a
code is at most half its group's scale.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

BITS = {"int8": 8, "int4": 4}
GROUP = 64  # elements per group, at most; the file records the size it used
# the paused hidden states keep 8 bits whatever the storage: every query recomputes the deeper layers from
# them, and at 4 bits their error changed far more answers than the keys' and values' (docs/benchmarks.md)
HIDDEN_BITS = 8
PARAM_DTYPE = torch.float16  # scales and zero points


@dataclass(frozen=True)
class Quantized:
    """A tensor as stored: `codes` (uint8; int4 packed flat to ceil(numel / 2) bytes), per-group
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
    return Quantized(pack(codes) if bits == 4 else codes.contiguous(), scale, zero)


def dequantize(q: Quantized, shape: tuple[int, ...], bits: int, group: int, dim: int, dtype: torch.dtype) -> Tensor:
    """The tensor of `shape` that `q` stores, in `dtype` (shapes checked by the caller)."""
    dim = dim % len(shape)
    codes = unpack(q.codes, math.prod(shape)).reshape(shape) if bits == 4 else q.codes
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


def pack(codes: Tensor) -> Tensor:
    """4-bit codes (uint8, values < 16) -> ceil(numel / 2) bytes, two codes a byte, the first low."""
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack(packed: Tensor, numel: int) -> Tensor:
    """Inverse of `pack` -> `numel` codes, flat."""
    codes = packed.new_empty(2 * packed.numel())
    torch.bitwise_and(packed, 15, out=codes[0::2])
    torch.bitwise_right_shift(packed, 4, out=codes[1::2])
    return codes[:numel]


def stored_numel(numel: int, bits: int) -> int:
    """Elements of the stored codes tensor for `numel` values."""
    return -(-numel // 2) if bits == 4 else numel
