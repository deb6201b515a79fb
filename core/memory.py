"""Estimate the peak memory of a prefill and check, before running it, that the device has room.

The estimate is a pure function of the model config, the prompt length, the method, the dtype and
the device kind. It counts, in bytes:

- weights: every parameter, in the model's dtype;
- cache: the KV cache when the prefill ends (keys, values, int64 positions), at the method's budget;
- activations: what the runner's layer loop holds at once over the full prompt. The peak is inside
  the MLP of a full-length layer: the hidden states before and after attention, the MLP's input,
  three [n, intermediate] tensors (silu(gate), up, their product), q/k/v, and the RoPE tables;
- allocator: what the process holds beyond that because freed memory is not returned at once. On
  CPU, glibc raises its mmap threshold as tensors are freed, so later ones come from the heap, which
  keeps most of what a layer frees until the layer ends: resident memory approaches everything one
  layer allocates (norms in fp32 as HF computes them, RoPE temporaries, the attention output, the
  MLP...). The allowance is that sum less the activations. Measured on the embedded SmolLM2-135M at
  2K and 6K tokens (tests/core/test_memory.py): with glibc's threshold fixed, peak RSS is the activations
  plus the cache within a few percent; with the default allocator it varies from run to run between
  about 1.2x and 2.5x the activations, around the sum. On CUDA the caching allocator's reserve plays
  the same part (not measured here: no GPU); the same allowance is kept there;
- attention: workspace beyond the attention output. SDPA's fused kernels (CPU flash, CUDA flash in
  half precision, flash-attn) need O(n) memory; CUDA in float32 falls back to SDPA's math path,
  which materializes the [heads, n, n] scores. Plus the selection scores of the last window;
- decoding: the cache's growth room once answer tokens are appended (kvcache.LayerKV.append);
- saving (`cache build`): the stored copy of the cache and its serialized bytes, held with the cache, as the
  storage's codec counts them (core/storage: an int8/int6/int4 copy's codes and the float16 scale and zero point
  of every group, for instance), and what its encoder holds meanwhile.

The check compares what the run still has to allocate with what the device has free: on CPU,
MemAvailable (capped by a cgroup memory limit), counting weights that are memory-mapped from their
file as still to come (their pages are reclaimable page cache in MemAvailable); on CUDA,
`torch.cuda.mem_get_info` plus what torch's allocator holds unused.
"""

from bisect import bisect_right
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from core.errors import MemoryLimitError
from core.methods import Budget, Method
from core.storage import Extent, codec_for, stored_bytes

GIB = 1 << 30
FP32 = 4
DECODE_ROOM = 256  # tokens each layer's cache grows by when the first answer token is appended


@dataclass(frozen=True)
class Sizes:
    """The dimensions of a supported decoder that memory depends on."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool  # lm_head shares the embedding matrix
    qk_norm: bool  # qwen3: RMS norms on q and k per head
    qkv_bias: bool  # qwen2: biases on the q/k/v projections

    @classmethod
    def of(cls, config) -> "Sizes":
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=heads,
            kv_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            qk_norm=config.model_type == "qwen3",
            qkv_bias=config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
        )

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def parameters(self) -> int:
        q, kv, h = self.q_width, self.kv_width, self.hidden
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate + 2 * h
        per_layer += (q + 2 * kv) if self.qkv_bias else 0
        per_layer += 2 * self.head_dim if self.qk_norm else 0
        return self.vocab * h * (1 if self.tied else 2) + self.layers * per_layer + h


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes held at the peak of a prefill and what follows it, by what holds them."""

    tokens: int
    weights: int
    cache: int
    activations: int
    allocator: int
    attention: int
    decoding: int = 0
    saving: int = 0

    @property
    def held(self) -> int:
        """What the prefill holds at once beyond the weights (an allocator that returns every freed block)."""
        return self.cache + self.activations + self.attention

    @property
    def beyond_weights(self) -> int:
        """The largest of: the prefill's peak with the allocator's allowance, the cache grown by
        decoding, the cache while it is saved."""
        return max(self.held + self.allocator, self.cache + self.decoding, self.cache + self.saving)

    @property
    def total(self) -> int:
        return self.weights + self.beyond_weights


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def rms_norm_bytes(width: int, b: int) -> int:
    """HF's RMSNorm per token: x in fp32, x**2, x * rsqrt(var), weight * x (+ the two casts in half precision)."""
    return 3 * FP32 * width + (0 if b == FP32 else 2 * b * width)


def held_bytes_per_token(s: Sizes, b: int) -> int:
    """What the layer loop holds at its peak, inside the MLP, per token of the prompt."""
    hidden = 3 * s.hidden  # the hidden states before and after attention, the MLP's normed input
    return b * (hidden + 3 * s.intermediate + s.q_width + 2 * s.kv_width + 2 * s.head_dim)  # + q/k/v, cos/sin


def allocated_bytes_per_token(s: Sizes, b: int) -> int:
    """Everything one decoder layer of the runner allocates per token of the prompt."""
    q, kv = s.q_width, s.kv_width
    total = 2 * rms_norm_bytes(s.hidden, b)  # input and post-attention norms
    total += b * (q + 2 * kv)  # q/k/v projections
    total += (rms_norm_bytes(q, b) + rms_norm_bytes(kv, b)) if s.qk_norm else 0
    total += 9 * b * (q + kv) // 2  # RoPE on q and k: x*cos, rotate_half (neg, cat), *sin, the sum
    total += 2 * b * q  # attention output and its [n, heads * head_dim] copy
    total += 2 * b * s.hidden  # o_proj and the residual sum
    total += 4 * b * s.intermediate + 2 * b * s.hidden  # gate, silu, up, their product; down_proj, residual
    return total


def attention_bytes(s: Sizes, tokens: int, b: int, device: str, window: int) -> int:
    """Workspace beyond the attention output, plus the window's selection scores."""
    scores = FP32 * tokens * (2 * s.heads * window + 2 * s.heads + s.kv_heads)  # window_scores, fp32
    scores += 0 if b == FP32 else FP32 * tokens * s.kv_width  # keys cast to fp32 for scoring
    if device == "cuda" and b == FP32:  # no fused kernel: SDPA's math path, scores and softmax, K/V repeated
        return scores + tokens * tokens * (2 * FP32 * s.heads + 1) + 2 * b * tokens * s.q_width
    return scores


def estimate_prefill(
    config,
    tokens: int,
    method: Method,
    dtype: torch.dtype,
    device: str,
    new_tokens: int = 0,
    saved_dtype: torch.dtype | str | None = None,
) -> MemoryEstimate:
    """Peak bytes of prefilling `tokens` with `method` in `dtype` on `device` ("cpu" or "cuda"), then
    decoding `new_tokens` (ask) or saving the cache in `saved_dtype` (cache build: a torch dtype or a
    --cache-dtype name, the quantized ones included)."""
    s, b = Sizes.of(config), element_size(dtype)
    entry = 2 * b * s.kv_width + 8 * s.kv_heads  # keys, values and an int64 position per KV head
    slots = method.peak_cache_tokens(tokens, s.layers)
    held = held_bytes_per_token(s, b)
    allocated = allocated_bytes_per_token(s, b) + b * s.hidden + 2 * b * s.head_dim  # + what lives across layers
    growth = s.layers * max(new_tokens, DECODE_ROOM, slots // s.layers // 8) if new_tokens else 0
    held_tokens = method.held_tokens(tokens)  # whose hidden states a paused prefill keeps
    paused = s.hidden * held_tokens
    extent = Extent(s.layers, s.kv_heads, s.head_dim, s.hidden, slots, held_tokens)
    stored = 0
    if saved_dtype is not None:  # a copy and its bytes, and what encoding the copy holds
        stored = 2 * stored_bytes(saved_dtype, extent) + codec_for(saved_dtype).working_bytes(extent)
    return MemoryEstimate(
        tokens=tokens,
        weights=s.parameters() * b,
        cache=slots * entry + paused * b,
        activations=tokens * held,
        allocator=tokens * max(allocated - held, 0),
        attention=attention_bytes(s, tokens, b, device, getattr(method, "scoring_window", 8)),
        decoding=growth * entry,
        saving=stored,
    )


def amount(n: int) -> str:
    """Bytes for a message: "512 MiB", "2.31 GiB", "48 GiB"."""
    if n < GIB:
        return f"{max(n, 0) / (1 << 20):,.0f} MiB"
    return f"{n / GIB:.2f} GiB" if n < 10 * GIB else f"{n / GIB:,.0f} GiB"


@dataclass(frozen=True)
class MemoryGuard:
    """Checks prefills of one loaded model against what its device has free right now."""

    config: object
    dtype: torch.dtype
    device: str  # "cpu" or "cuda"
    free: int  # bytes the device can still give this process
    mapped_weights: int  # weight bytes still to come: memory-mapped from their file (CPU)
    resident_weights: int  # weight bytes already counted as used

    @classmethod
    def for_model(cls, model) -> "MemoryGuard | None":
        """The guard for a loaded model; None where free memory cannot be read (no check then)."""
        device = model.device
        free = free_bytes(device)
        if free is None:
            return None
        weights = sum(p.nbytes for p in model.parameters())
        mapped = mapped_bytes(model.parameters()) if device.type == "cpu" else 0
        return cls(model.config, model.dtype, device.type, free, mapped, weights - mapped)

    def estimate(
        self, tokens: int, method: Method, new_tokens: int = 0, saved_dtype=None, dtype=None
    ) -> MemoryEstimate:
        return estimate_prefill(self.config, tokens, method, dtype or self.dtype, self.device, new_tokens, saved_dtype)

    def needed(self, estimate: MemoryEstimate) -> int:
        """Bytes the run still has to find: everything beyond the weights, and the mapped weights."""
        return estimate.beyond_weights + self.mapped_weights

    def fits(self, estimate: MemoryEstimate) -> bool:
        return self.needed(estimate) <= self.free

    def most_tokens(self, method: Method, new_tokens: int = 0, saved_dtype=None) -> int:
        """The longest prompt that fits (0: none)."""
        return largest(0, 1 << 40, lambda n: self.fits(self.estimate(n, method, new_tokens, saved_dtype)))

    def check(self, tokens: int, method: Method, new_tokens: int = 0, saved_dtype=None, truncating: bool = False):
        """Raise MemoryLimitError, naming both numbers and what would fit, unless the prefill fits."""
        estimate = self.estimate(tokens, method, new_tokens, saved_dtype)
        if self.fits(estimate):
            return estimate
        raise MemoryLimitError(
            f"the prefill of {tokens:,} tokens needs about {amount(self.needed(estimate))} more memory "
            f"(peak {amount(estimate.total)} with the weights) but {self.device} has {amount(self.free)} free; "
            + "; ".join(self.suggestions(tokens, method, new_tokens, saved_dtype, truncating))
        )

    def suggestions(self, tokens: int, method: Method, new_tokens: int, saved_dtype, truncating: bool) -> list[str]:
        """What would fit, in the order worth trying, and the override."""
        found = []
        budget, window = getattr(method, "budget", None), getattr(method, "scoring_window", 1)
        if isinstance(budget, Budget) and not method.restarts:

            def fits(n: int) -> bool:
                return self.fits(self.estimate(tokens, with_budget(method, n), new_tokens, saved_dtype))

            if fits(window):
                found.append(f"--budget {largest(window, min(budget.tokens(tokens), tokens), fits)} fits")
        most = self.most_tokens(method, new_tokens, saved_dtype)
        if most > 0 and not truncating:  # (when truncating, the documents were already cut to fit)
            found.append(f"--truncate middle keeps {most:,} tokens")
        if self.dtype == torch.float32:
            half = self.estimate(tokens, method, new_tokens, saved_dtype, dtype=torch.bfloat16)
            if half.total <= self.free + self.resident_weights:
                found.append("--dtype bfloat16 fits")
        return found + ["--ignore-memory tries anyway"]


def largest(low: int, high: int, ok) -> int:
    """The largest n in [low, high) with ok(n), for ok true up to some n and false after (low: none)."""
    while high - low > 1:
        middle = (low + high) // 2
        if ok(middle):
            low = middle
        else:
            high = middle
    return low


def with_budget(method: Method, tokens: int) -> Method:
    return replace(method, budget=Budget(tokens, proportional=False))


def free_bytes(device: torch.device) -> int | None:
    """What the device can still give this process; None where that cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    available, room = meminfo_available(), cgroup_room()
    if available is None or room is None:
        return available if room is None else room
    return min(available, room)


def meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_room() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2); None without a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def mapped_bytes(tensors) -> int:
    """Bytes of `tensors` whose storage is a file mapping (safetensors loads by mmap): their pages are
    page cache, which MemAvailable counts as free, so the prefill still has to find room for them."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return 0
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    ranges.sort()
    starts = [start for start, _ in ranges]
    total = 0
    for tensor in tensors:
        i = bisect_right(starts, tensor.data_ptr()) - 1
        if i >= 0 and tensor.data_ptr() < ranges[i][1]:
            total += tensor.nbytes
    return total
