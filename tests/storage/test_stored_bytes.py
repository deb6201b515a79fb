"""The bytes each codec counts for a cache it has not stored yet, against the tensors it stores, and the memory
estimate of `cache build` (core/memory.py) asking it."""

from types import SimpleNamespace

import pytest
import torch

from core.memory import FP32, Sizes, estimate_prefill
from core.methods import PauseAfter, make_method
from core.runner import Runner
from core.storage import Extent, cache_tensors, codec_for, quantization_for, stored_bytes
from core.storage.codecs import BLOCK_BYTES, CHUNK_BYTES
from core.storage.coded import CHUNK

TOKENS = 300  # every layer ends with a short group of keys


def prefilled(model, paused: bool):
    """The cache of a 300-token prefill, paused after layer 1 or every token kept, and the Extent it stores."""
    method = PauseAfter(layer=1) if paused else make_method("fullkv")
    ids = torch.randint(0, model.config.vocab_size, (TOKENS,), generator=torch.Generator().manual_seed(0))
    cache = Runner(model).prefill(ids, method).cache
    s = Sizes.of(model.config)
    slots = method.peak_cache_tokens(TOKENS, s.layers)
    return cache, method, Extent(s.layers, s.kv_heads, s.head_dim, s.hidden, slots, method.held_tokens(TOKENS))


def dims(extent: Extent) -> SimpleNamespace:
    """What quantization_for reads of a model."""
    return SimpleNamespace(head_dim=extent.head_dim, hidden_size=extent.hidden)


@pytest.mark.parametrize("paused", [False, True], ids=["fullkv", "paused"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8", "int6", "int4"])
def test_the_stored_bytes_bound_the_stored_tensors_scales_and_zeros_included(tiny_models, dtype, paused):
    """An int8 file's float16 scales and zero points add 4 bytes per group of 64 (about 6%): counting only
    the codes would undercount it. The count may round a short last group of keys up, little more."""
    model = tiny_models["qwen2"]
    cache, method, extent = prefilled(model, paused)
    scheme = quantization_for(dtype, dims(extent), 1 if paused else None)

    stored = sum(t.nbytes for t in cache_tensors(cache, dtype, scheme).values())
    estimate = estimate_prefill(model.config, TOKENS, method, torch.float32, "cpu", saved_dtype=dtype)

    assert stored <= stored_bytes(dtype, extent) <= 1.05 * stored
    assert estimate.saving == 2 * stored_bytes(dtype, extent)  # the stored copy, then its serialized bytes


def test_a_coded_save_is_counted_as_int6_plus_its_working_memory(tiny_models):
    """Coded storage is counted as int6's bytes, which it stays under, plus what coding holds: the keys and values
    as float32 channels, a block's symbols and words, a chunk's codes (core/storage/coded.py; measured on the
    embedded model at 7.5K tokens: a save grew the process's peak by 427 MiB, estimated 673)."""
    model = tiny_models["qwen2"]
    cache, method, extent = prefilled(model, paused=True)
    coded_file = cache_tensors(cache, "coded", quantization_for("coded", dims(extent), 1), Runner(model))
    int6_file = cache_tensors(cache, "int6", quantization_for("int6", dims(extent), 1))

    coded, int6 = (
        estimate_prefill(model.config, TOKENS, method, torch.float32, "cpu", saved_dtype=d) for d in ("coded", "int6")
    )
    s = Sizes.of(model.config)
    kv, hidden = 2 * TOKENS * 2 * s.kv_width, TOKENS * s.hidden  # layers 0 and 1 hold every token
    assert sum(t.nbytes for t in coded_file.values()) < sum(t.nbytes for t in int6_file.values())
    assert stored_bytes("coded", extent) == stored_bytes("int6", extent)
    assert codec_for("coded").working_bytes(extent) == FP32 * kv + BLOCK_BYTES * (kv + hidden) + CHUNK_BYTES * CHUNK
    assert coded.saving - int6.saving == codec_for("coded").working_bytes(extent)
