"""The `coded` storage (DESIGN.md §10): each stored tensor rounded to one step, its codes entropy-coded.

The step of a tensor is the one whose rounding error, step**2 / 12, is the mean squared error int6 storage
(quant.py's groups and widths) makes on it; with one step for the whole tensor the codes
of a quiet channel are small numbers, and rANS (rans.py) stores each in about as many bits as it
carries instead of a fixed width: 5.3 bits a value where int6 spends 6.5 with its scales.

Every coded tensor is a set of channels over the context's tokens (a layer's keys or values, num_kv_heads *
head_dim channels; the hidden states, hidden_size). A channel is coded as its codes less its median, with a
frequency table shared by the channels of about the same spread; offsets beyond SPAN are escaped and stored
whole. A channel's tokens are dealt into lanes of at most LANE_TOKENS, and the lanes of up to BLOCK codes
are one rANS stream.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from core.storage import rans
from core.storage.quant import dequantize, quantize

SPAN = 255  # offsets from a channel's median coded as symbols; farther ones escape
ESCAPE = 2 * SPAN + 1
ALPHABET = ESCAPE + 1
LANE_TOKENS = 2048  # the most tokens of a channel one lane codes: 4 bytes of rANS state a lane, a load step a token
SPREADS = 4  # classes of channels per doubling of their mean absolute offset: each class has its own table
BLOCK = 1 << 26  # codes in one rANS stream at most: a load decodes each in one pass, a save holds its symbols
CHUNK = 1 << 22  # codes an encoder rounds and counts at a time: with BLOCK, what bounds a save's memory


@dataclass(frozen=True)
class Coded:
    """Codes [tokens, channels] as stored: rANS `words` (int16) of every block, one after the other, and each
    block's count (`lengths`, int64), `tables` (int16 [tables, ALPHABET] frequencies), each channel's table
    (`classes`, uint8) and median (`centers`, int32), and the escaped offsets (`escapes`, int64 [count, 2]:
    flat index into the codes, offset)."""

    words: Tensor
    lengths: Tensor
    tables: Tensor
    classes: Tensor
    centers: Tensor
    escapes: Tensor


@dataclass(frozen=True)
class Codes:
    """Codes [tokens, channels] as decoded, kept as symbols so that a load writes each tensor's floats straight
    from them: `symbols` (int16 [tokens, channels], a code's offset from its channel's median + SPAN, or ESCAPE),
    `centers` (the medians, int32 [channels]) and the escaped codes (`escaped`: flat indices, in order; `values`)."""

    symbols: Tensor
    centers: Tensor
    escaped: Tensor
    values: Tensor

    def scaled(self, start: int, stop: int, step: float, out: Tensor) -> Tensor:
        """Channels [start, stop) times `step` into `out` (floating, [tokens, ...] of any strides, its trailing
        dims those channels in order) -> out."""
        shape = tuple(out.shape)
        out.copy_(self.symbols[:, start:stop].view(shape))
        out.add_((self.centers[start:stop] - SPAN).view(shape[1:])).mul_(step)  # exact sums: each code, times step
        token, channel = self.escaped // len(self.centers), self.escaped % len(self.centers)
        inside = (channel >= start) & (channel < stop)
        at = (token[inside], *torch.unravel_index(channel[inside] - start, shape[1:]))
        out[at] = self.values[inside].to(out.dtype) * step
        return out


def step_for(x: Tensor, bits: int, group: int, dim: int) -> float:
    """The step whose rounding error (step**2 / 12) is the mean squared error of `bits`-bit group-wise affine
    storage (quant.py) on `x`: the same error, spread evenly."""
    x = x.float()
    error = (dequantize(quantize(x, bits, group, dim), tuple(x.shape), bits, group, dim, torch.float32) - x).pow(2)
    step = math.sqrt(12 * float(error.mean()))
    return step if step > 0 else 1.0  # a tensor int6 stores exactly (a constant one): any step


def lanes(tokens: int, lane_tokens: int) -> tuple[int, int]:
    """(lanes a channel's `tokens` are dealt into, tokens each lane codes): the last tokens padded."""
    count = -(-tokens // lane_tokens)
    return count, -(-tokens // count)


def blocks(channels: int, tokens: int) -> list[tuple[int, int]]:
    """The [start, stop) channel ranges coded as one rANS stream each: as few as BLOCK allows (a load takes one
    Python step a lane token of each), never less than a channel."""
    per_block = max(1, BLOCK // tokens)
    return [(start, min(start + per_block, channels)) for start in range(0, channels, per_block)]


def encode(columns: Callable[[int, int], Tensor], channels: int, tokens: int, lane_tokens: int = LANE_TOKENS) -> Coded:
    """The codes [tokens, channels] that columns(start, stop) gives, a range of channels at a time (int64 [tokens,
    stop - start]; each range asked twice: once for the tables, once to code) -> their stored form, in lanes of at
    most `lane_tokens`."""
    centers = torch.empty(channels, dtype=torch.int64)
    spreads = torch.empty(channels, dtype=torch.int64)
    counts = torch.zeros(SPREADS * 9 + 1, ALPHABET, dtype=torch.int64)
    for start, stop in chunks(0, channels, tokens):
        codes = columns(start, stop)
        centers[start:stop] = codes.median(0).values
        offsets = codes - centers[start:stop]
        spread = spread_classes(offsets)
        spreads[start:stop] = spread
        counts += torch.bincount((symbols_of(offsets) + spread * ALPHABET).view(-1), minlength=counts.numel()).view(
            counts.shape
        )
    count, steps = lanes(tokens, lane_tokens)
    counts[:, SPAN] += torch.bincount(spreads, minlength=len(counts)) * (count * steps - tokens)  # padding: offset 0
    used, classes = torch.unique(spreads, return_inverse=True)  # a table for each spread present
    tables = rans.frequencies(counts[used])
    words, lengths, escapes = [], [], []
    for first, last in blocks(channels, tokens):
        # lane j of channel c (lane j * channels + c) codes tokens j, j + count, j + 2 * count, ...: the decoded
        # [steps, lanes] are then the tokens in order, channels innermost, with no copy
        symbols = torch.full((count * steps, last - first), SPAN, dtype=torch.int16)
        for start, stop in chunks(first, last, tokens):
            offsets = columns(start, stop) - centers[start:stop]
            token, channel = (offsets.abs() > SPAN).nonzero().unbind(1)
            escapes.append(torch.stack([token * channels + start + channel, offsets[token, channel]], 1))
            symbols[:tokens, start - first : stop - first] = symbols_of(offsets)
        words.append(rans.encode(symbols.view(steps, -1), classes[first:last].repeat(count), tables))
        lengths.append(words[-1].numel())
    escapes = torch.cat(escapes)
    return Coded(
        torch.cat(words), torch.tensor(lengths), tables.to(torch.int16), classes.to(torch.uint8),
        centers.to(torch.int32), escapes[escapes[:, 0].argsort()],
    )  # fmt: skip


def chunks(first: int, last: int, tokens: int) -> list[tuple[int, int]]:
    """Channel ranges of about CHUNK codes inside [first, last): what an encoder rounds and counts at a time."""
    per_chunk = max(1, CHUNK // tokens)
    return [(start, min(start + per_chunk, last)) for start in range(first, last, per_chunk)]


def spread_classes(offsets: Tensor) -> Tensor:
    """Each channel's table class from its offsets [tokens, channels]: SPREADS classes per doubling of the mean
    absolute offset."""
    return (offsets.abs().clamp(max=SPAN).float().mean(0) + 1).log2().mul(SPREADS).round().long()


def symbols_of(offsets: Tensor) -> Tensor:
    """Offsets from a channel's median -> symbols: offset + SPAN, or ESCAPE beyond SPAN."""
    return torch.where(offsets.abs() > SPAN, ESCAPE, offsets + SPAN)


def decode(coded: Coded, channels: int, tokens: int, lane_tokens: int) -> Codes:
    """The codes [tokens, channels] that `coded` stores in lanes of at most `lane_tokens`. Raises ValueError naming
    the part that does not fit, each part checked before anything is sized by it (`tokens` the caller has checked
    against stored data)."""
    words, lengths, tables, classes, centers, escapes = (
        coded.words, coded.lengths, coded.tables, coded.classes, coded.centers, coded.escapes
    )  # fmt: skip
    if centers.dtype != torch.int32 or tuple(centers.shape) != (channels,):
        raise ValueError(f"coded.centers should hold {channels:,} int32 medians")
    count, steps = lanes(tokens, lane_tokens)
    if words.dtype != torch.int16 or words.dim() != 1 or words.numel() < 2 * count * channels:
        raise ValueError(f"coded.words should be int16 words, at least 2 for each of the {count * channels:,} lanes")
    ranges = blocks(channels, tokens)
    if lengths.dtype != torch.int64 or tuple(lengths.shape) != (len(ranges),) or (lengths < 0).any():
        raise ValueError(f"coded.lengths should count the words of each of the {len(ranges)} blocks")
    if int(lengths.sum()) != words.numel():
        raise ValueError(f"coded.lengths count {int(lengths.sum()):,} words where coded.words holds {words.numel():,}")
    if tables.dtype != torch.int16 or tables.dim() != 2 or tables.shape[1] != ALPHABET or not len(tables):
        raise ValueError(f"coded.tables should be int16 frequency tables of {ALPHABET} symbols")
    frequencies = tables.long()
    if (frequencies < 0).any() or (frequencies.sum(1) != rans.TOTAL).any():
        raise ValueError(f"coded.tables should hold frequencies summing to {rans.TOTAL} a table")
    if classes.dtype != torch.uint8 or tuple(classes.shape) != (channels,) or classes.long().max() >= len(tables):
        raise ValueError(f"coded.classes should name one of the {len(tables)} tables for each of {channels:,} channels")
    decoded = []
    for (start, stop), block_words in zip(ranges, words.split(lengths.tolist()), strict=True):
        try:
            block = rans.decode(block_words, classes[start:stop].long().repeat(count), frequencies, steps)
        except rans.CorruptStream as error:
            raise ValueError(f"coded.words do not decode ({error})") from None
        decoded.append(block.view(count * steps, stop - start)[:tokens])
    symbols = decoded[0] if len(decoded) == 1 else torch.cat(decoded, 1)
    rows = (symbols.amax(1) == ESCAPE).nonzero().squeeze(1)  # ESCAPE is the largest symbol
    token, channel = (symbols[rows] == ESCAPE).nonzero().unbind(1)
    escaped = rows[token] * channels + channel  # in index order: token-major, then channel
    if escapes.dtype != torch.int64 or tuple(escapes.shape) != (len(escaped), 2):
        raise ValueError(f"coded.escapes should hold the {len(escaped):,} escaped offsets as int64 pairs")
    if not torch.equal(escapes[:, 0], escaped) or (escapes[:, 1].abs() <= SPAN).any():
        raise ValueError("coded.escapes does not match the escaped symbols")
    values = (escapes[:, 1] + centers.long()[escaped % channels]).clamp(-(2**31), 2**31 - 1)
    return Codes(symbols, centers, escaped, values)


def rounded(x: Tensor, step: float) -> Tensor:
    """x's codes at `step` (int64)."""
    return torch.round(x.float() / step).long()


def check_step(step: Tensor, name: str) -> float:
    """A stored step (float32 [1]) -> its value; ValueError unless finite and positive."""
    if step.dtype != torch.float32 or tuple(step.shape) != (1,):
        raise ValueError(f"{name}.step should be one float32 number")
    value = float(step)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}.step is {value}, not a finite positive step")
    return value
