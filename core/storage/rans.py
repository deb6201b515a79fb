"""Entropy coding of small integers: rANS (Duda, arXiv 1311.2540) on many lanes at once, for the coded codec.

A lane is one stream of symbols coded with one frequency table. Lanes advance in step, so decoding takes
every lane's next symbol in a few vector operations, and they share one stream of 16-bit words: whenever a
lane's state runs low it takes the next word, lanes in order. rANS is a stack: the encoder runs from the
last symbol back to the first and the stream is read from its end, each lane's final state first, so a
decoder that ends with every state back at its start and every word read has read what was written.
"""

import torch
from torch import Tensor

PRECISION = 14  # a table's frequencies sum to 2**PRECISION
TOTAL = 1 << PRECISION
WORD = 16  # bits a lane writes or reads at a time
LOW_BITS = 15  # between symbols a state lies in [LOW, LOW << WORD), below 2**31: int32 arithmetic when decoding
LOW = 1 << LOW_BITS


class CorruptStream(ValueError):
    """The words do not decode to what an encoder wrote: too few, too many, or states that end elsewhere."""


def frequencies(counts: Tensor) -> Tensor:
    """Counts [tables, alphabet] -> frequencies summing to TOTAL per row, nonzero wherever the count is
    (a row of zero counts gets a uniform table). Needs alphabet <= TOTAL."""
    counts = counts.to(torch.int64)
    empty = counts.sum(1, keepdim=True) == 0
    counts = torch.where(empty, torch.ones_like(counts), counts)
    used = counts > 0
    freqs = torch.where(used, (counts * TOTAL / counts.sum(1, keepdim=True)).floor().clamp(min=1), 0).to(torch.int64)
    # move the rounding's excess or shortfall onto each row's most frequent symbol, which it costs least
    top = freqs.argmax(1, keepdim=True)
    freqs.scatter_add_(1, top, TOTAL - freqs.sum(1, keepdim=True))
    if (freqs.gather(1, top) < 1).any():
        raise ValueError("an alphabet too large for the coder's precision")
    return freqs


def encode(symbols: Tensor, tables: Tensor, freqs: Tensor) -> Tensor:
    """symbols [steps, lanes] (each of nonzero frequency in its lane's table), tables [lanes] (row of `freqs`
    per lane), freqs [tables, alphabet] (rows summing to TOTAL) -> the words, as int16."""
    steps, lanes = symbols.shape
    starts = (freqs.cumsum(1) - freqs).view(-1)
    base = tables * freqs.shape[1]  # each lane's table in the flattened tables
    state = torch.full((lanes,), LOW, dtype=torch.int64)
    written = []  # in the reverse of reading order
    for step in range(steps - 1, -1, -1):
        at = base + symbols[step]
        freq = freqs.view(-1)[at]
        full = state >= freq << (WORD + LOW_BITS - PRECISION)  # encoding would leave [LOW, LOW << WORD): spill a word
        written.append((state[full] & 0xFFFF).to(torch.int16).flip(0))  # 16-bit words, wrapped into int16
        state = torch.where(full, state >> WORD, state)
        state = (state // freq << PRECISION) + state % freq + starts[at]
    written.append(torch.stack([state >> WORD, state & 0xFFFF], 1).view(-1).to(torch.int16).flip(0))
    return torch.cat(written).flip(0)


def decode(words: Tensor, tables: Tensor, freqs: Tensor, steps: int) -> Tensor:
    """Inverse of `encode` -> symbols [steps, lanes] (int16: alphabets of at most 2**15). Raises CorruptStream
    where the words were not written by `encode` with these tables (damage the rANS states themselves reveal)."""
    lanes = tables.numel()
    end = words.numel()
    if end < 2 * lanes:
        raise CorruptStream(f"{end} words, fewer than the {2 * lanes} of the lanes' states")
    first = words[: 2 * lanes].to(torch.int32) & 0xFFFF
    state = first[0::2] << WORD | first[1::2]
    read = 2 * lanes
    # per table and slot of [0, TOTAL): its symbol, and its symbol's frequency << 16 | (slot - the symbol's start)
    cumulative = freqs.cumsum(1)
    slots = torch.arange(TOTAL)
    symbol = torch.searchsorted(cumulative, slots.expand(freqs.shape[0], -1).contiguous(), right=True)
    frequency = freqs.gather(1, symbol)
    update = (frequency << 16 | slots - cumulative.gather(1, symbol) + frequency).to(torch.int32).view(-1)
    symbol = symbol.to(torch.int16).view(-1)
    base = (tables * TOTAL).to(torch.int32)
    out = torch.empty(steps, lanes, dtype=torch.int16)
    index, found, word, shifted, low, taken = (torch.empty(lanes, dtype=torch.int32) for _ in range(6))
    stored = torch.empty(lanes, dtype=torch.int16)
    for step in range(steps):  # in place and into buffers: a step is a few passes over the lanes, no allocation
        torch.bitwise_and(state, TOTAL - 1, out=index).add_(base)
        torch.index_select(symbol, 0, index, out=out[step])
        torch.index_select(update, 0, index, out=found)
        state.bitwise_right_shift_(PRECISION).mul_(torch.bitwise_right_shift(found, 16, out=shifted))
        state.add_(found.bitwise_and_(0xFFFF))
        torch.sub(state, LOW, out=low).bitwise_right_shift_(31)  # -1 where a state ran low, else 0
        torch.cumsum(low, 0, out=taken).neg_()  # the lanes that read take the next words in order
        wanted = int(taken[-1]) if lanes else 0
        if read + wanted > end:
            raise CorruptStream(f"the lanes ask for more than the {end} words")
        torch.index_select(words, 0, taken.add_(read - 1), out=stored)  # a lane that reads nothing: a word read before
        word.copy_(stored).bitwise_and_(0xFFFF)
        word.bitwise_or_(torch.bitwise_left_shift(state, WORD, out=shifted))
        state.bitwise_xor_(word.bitwise_xor_(state).bitwise_and_(low))  # the read-in state where low, else as was
        read += wanted
    if read != end or bool((state != LOW).any()):
        raise CorruptStream("the lanes' states do not decode back to their start")
    return out
