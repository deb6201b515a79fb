"""The compressed KV cache: per layer and KV head, the kept keys, values and their original positions."""

from dataclasses import dataclass, field

import torch
from torch import Tensor

EMPTY = -1  # the position of an empty slot


class LayerKV:
    """One layer's cache: per KV head, the kept keys, values and their original positions.

    Appending writes into spare room at the end of the buffers (grown by a share of the length
    when full), so decoding does not copy the whole cache for every new token. Heads may keep
    different numbers of tokens (head-adaptive budgets, AdaKV): each head's row is then padded at
    its start with empty slots (position EMPTY, zero keys and values) that attention never sees, so
    positions still increase along every row and appending stays the same for all heads.
    """

    def __init__(self, keys: Tensor, values: Tensor, positions: Tensor, padded: bool = False):
        self.buffers = (keys, values, positions)  # [kv_heads, capacity, head_dim] x2, [kv_heads, capacity]
        self.length = keys.shape[1]
        self.padded = padded  # whether any slot may be empty

    @property
    def keys(self) -> Tensor:  # [kv_heads, n, head_dim], RoPE already applied
        return self.buffers[0][:, : self.length]

    @property
    def values(self) -> Tensor:  # [kv_heads, n, head_dim]
        return self.buffers[1][:, : self.length]

    @property
    def positions(self) -> Tensor:  # [kv_heads, n] int64, original token positions, increasing per head
        return self.buffers[2][:, : self.length]

    @property
    def valid(self) -> Tensor | None:  # [kv_heads, n] bool, False at empty slots; None when none is empty
        return self.positions != EMPTY if self.padded else None

    @property
    def kept(self) -> int:
        """Tokens kept per KV head, averaged over the heads (empty slots not counted)."""
        if not self.padded:
            return self.length
        return round(int(self.valid.sum()) / self.positions.shape[0])

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def select(self, index: Tensor) -> "LayerKV":
        """Keep, per KV head, the slots at `index` ([kv_heads, m], sorted); an index of EMPTY there
        (only at the start of a row) makes an empty slot."""
        slots = index.clamp(min=0)
        gather = slots.unsqueeze(-1).expand(-1, -1, self.keys.shape[-1])
        keys, values, positions = (
            self.keys.gather(1, gather),
            self.values.gather(1, gather),
            self.positions.gather(1, slots),
        )
        empty = index == EMPTY
        if not bool(empty.any()):
            return LayerKV(keys, values, positions, padded=self.padded)
        zero = empty.unsqueeze(-1)
        return LayerKV(
            keys.masked_fill(zero, 0), values.masked_fill(zero, 0), positions.masked_fill(empty, EMPTY), padded=True
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None) -> "LayerKV":
        moved = self.keys.to(device, dtype), self.values.to(device, dtype), self.positions.to(device, torch.long)
        return LayerKV(*moved, padded=self.padded)

    def clone(self) -> "LayerKV":
        return LayerKV(self.keys.clone(), self.values.clone(), self.positions.clone(), padded=self.padded)

    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> "LayerKV":
        """Add new tokens in place and return self: keys/values [kv_heads, m, head_dim], positions [m]."""
        m = keys.shape[1]
        if self.length + m > self.buffers[0].shape[1]:
            self.grow(self.length + max(m, 256, self.length // 8))
        end = self.length + m
        self.buffers[0][:, self.length : end] = keys
        self.buffers[1][:, self.length : end] = values
        self.buffers[2][:, self.length : end] = positions
        self.length = end
        return self

    def grow(self, capacity: int) -> None:
        """Move into fresh buffers of `capacity` tokens (never writing into tensors we were given)."""
        grown = []
        for tensor in self.buffers:
            buffer = tensor.new_empty((tensor.shape[0], capacity, *tensor.shape[2:]))
            buffer[:, : self.length] = tensor[:, : self.length]
            grown.append(buffer)
        self.buffers = tuple(grown)


@dataclass(frozen=True)
class Paused:
    """A prefill stopped after `layer`: the hidden states every context token had leaving it.

    A query-aware saved cache holds every token's keys and values up to `layer` (the TSP layer) and
    nothing deeper; each question resumes the prefill from here with its own Token-Selective
    Propagation, so it answers as `ask` would (Runner.extend). `queries` holds, for each layer up to
    `layer`, the last context tokens' queries: where the scoring window is longer than a question,
    `ask` scores with those tokens too. `ids` are the context's token ids, from which layer 0's keys and
    values are rebuilt (Runner.first_layer) rather than stored.
    """

    layer: int
    hidden: Tensor  # [context tokens, hidden_size], in position order
    queries: Tensor | None  # [layer + 1, heads, held tokens, head_dim], after RoPE; None: none held
    ids: Tensor  # [context tokens] int64

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.hidden, self.queries, self.ids) if t is not None)

    def to(self, device: torch.device | str, dtype: torch.dtype | None) -> "Paused":
        queries = None if self.queries is None else self.queries.to(device, dtype)
        return Paused(self.layer, self.hidden.to(device, dtype), queries, self.ids.to(device))

    def window_queries(self, i: int, q: Tensor) -> Tensor:
        """Layer i's queries of the appended tokens q [heads, n, d], after the held context queries."""
        return q if self.queries is None else torch.cat([self.queries[i], q], dim=1)


@dataclass
class KVCache:
    """One LayerKV per decoder layer plus the true number of tokens consumed.

    `seq_len` is the position the next token gets: the context length, whatever the cache holds.
    `paused`: where a query-aware cache's prefill stopped, for each question to resume it.
    """

    layers: list[LayerKV] = field(default_factory=list)
    seq_len: int = 0
    paused: Paused | None = None

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def kept_tokens_per_layer(self) -> list[int]:
        return [layer.kept for layer in self.layers]

    def without_last(self, n: int) -> "KVCache":
        """The cache as it was before its last n tokens (which every layer keeps, in order, at the end)."""
        if n == 0:
            return self
        layers = []
        for layer in self.layers:
            index = torch.arange(layer.length - n, device=layer.keys.device).expand(layer.keys.shape[0], -1)
            layers.append(layer.select(index))
        return KVCache(layers, self.seq_len - n, self.paused)

    def clone(self) -> "KVCache":
        """An independent copy, so one question's tokens never reach another's cache (the paused
        hidden states are only ever read, so the copy shares them)."""
        return KVCache([layer.clone() for layer in self.layers], self.seq_len, self.paused)


def page_coverage(cache: KVCache, page_spans: list[tuple[int, int]]) -> list[float]:
    """For each [start, end) span of positions, the share of its tokens the cache keeps, averaged
    over KV heads and the layers that hold tokens: all of them, or a paused cache's layers up to the
    paused one, since each question fills the deeper ones (empty slots are at position EMPTY, outside
    every span)."""
    layers = cache.layers if cache.paused is None else cache.layers[: cache.paused.layer + 1]
    shares = []
    for start, end in page_spans:
        kept = sum(((layer.positions >= start) & (layer.positions < end)).sum().item() for layer in layers)
        slots = (end - start) * sum(layer.positions.shape[0] for layer in layers)
        shares.append(kept / slots if slots else 0.0)
    return shares


def full_kv_bytes(config, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes an uncompressed cache of `seq_len` tokens takes for this model config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
    return per_token * seq_len * torch.empty((), dtype=dtype).element_size()
