"""The runner's layer loop equals the HF model's own forward, cache and greedy decoding, per family."""

import pytest
import torch

from core.errors import InputError
from core.generation import Sampling, generate, next_token
from core.runner import Runner, appended_mask
from tests.helpers import hf_last_logits, random_ids

TOL = 1e-4  # fp32


def hf_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            ids.unsqueeze(0),
            attention_mask=torch.ones(1, ids.shape[0], dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
        )
    return out[0, ids.shape[0] :].tolist()


@pytest.mark.parametrize("n", [1, 37])
def test_prefill_logits_equal_hf_forward(tiny_model, n):
    ids = random_ids(n, tiny_model.config.vocab_size, seed=n)

    prefill = Runner(tiny_model).prefill(ids)

    expected = hf_last_logits(tiny_model, ids)
    assert prefill.logits.shape == expected.shape
    assert (prefill.logits - expected).abs().max() < TOL


def test_cache_is_per_kv_head_with_original_positions_and_equals_hf_cache(tiny_model):
    config, n = tiny_model.config, 29
    ids = random_ids(n, config.vocab_size, seed=1)

    cache = Runner(tiny_model).prefill(ids).cache

    with torch.inference_mode():
        hf_cache = tiny_model(ids.unsqueeze(0), use_cache=True).past_key_values
    assert cache.seq_len == n
    assert len(cache.layers) == config.num_hidden_layers
    for layer, hf_layer in zip(cache.layers, hf_cache.layers, strict=True):
        assert layer.keys.shape == (config.num_key_value_heads, n, config.head_dim)
        assert layer.values.shape == (config.num_key_value_heads, n, config.head_dim)
        assert torch.equal(layer.positions, torch.arange(n).expand(config.num_key_value_heads, n))
        assert (layer.keys - hf_layer.keys[0]).abs().max() < TOL  # after RoPE, like HF's cache
        assert (layer.values - hf_layer.values[0]).abs().max() < TOL


def test_greedy_decode_equals_hf_generate(tiny_model):
    steps = 8
    ids = random_ids(23, tiny_model.config.vocab_size, seed=2)
    runner = Runner(tiny_model)
    prefill = runner.prefill(ids)

    tokens = generate(runner, prefill.cache, prefill.logits, steps, stop_ids=set())

    assert tokens == hf_greedy(tiny_model, ids, steps)
    # every decoded token but the last was appended at the true next position
    assert prefill.cache.seq_len == 23 + steps - 1
    assert prefill.cache.layers[0].positions[0].tolist() == list(range(23 + steps - 1))


def test_generate_stops_before_a_stop_token(tiny_model):
    ids = random_ids(19, tiny_model.config.vocab_size, seed=3)
    expected = hf_greedy(tiny_model, ids, 8)
    stop_at = next(i for i in range(1, 8) if expected[i] not in expected[:i])
    runner = Runner(tiny_model)
    prefill = runner.prefill(ids)

    tokens = generate(runner, prefill.cache, prefill.logits, 8, stop_ids={expected[stop_at]})

    assert tokens == expected[:stop_at]


@pytest.mark.parametrize("chunks", [[9], [5, 4]], ids=["one-chunk", "two-chunks"])
def test_extend_after_cached_context_equals_one_pass(tiny_model, chunks):
    config = tiny_model.config
    context = random_ids(31, config.vocab_size, seed=4)
    question = random_ids(sum(chunks), config.vocab_size, seed=5)
    runner = Runner(tiny_model)

    cache = runner.prefill(context).cache
    for part in question.split(chunks):
        logits = runner.extend(cache, part)
    whole = runner.prefill(torch.cat([context, question]))

    total = 31 + sum(chunks)
    assert (logits - whole.logits).abs().max() < TOL
    assert (logits - hf_last_logits(tiny_model, torch.cat([context, question]))).abs().max() < TOL
    assert cache.seq_len == total
    for layer, one_pass in zip(cache.layers, whole.cache.layers, strict=True):
        assert layer.length == total
        assert torch.equal(layer.positions, one_pass.positions)
        assert (layer.keys - one_pass.keys).abs().max() < TOL
        assert (layer.values - one_pass.values).abs().max() < TOL


def test_the_last_layer_runs_its_mlp_on_the_last_token_only(tiny_model):
    """Only the last token's output of the last layer is read; every other layer runs on every token."""
    rows = {}
    hooks = [
        layer.mlp.register_forward_hook(lambda module, args, out, i=i: rows.setdefault(i, []).append(args[0].shape[0]))
        for i, layer in enumerate(tiny_model.model.layers)
    ]
    try:
        runner = Runner(tiny_model)
        cache = runner.prefill(random_ids(29, tiny_model.config.vocab_size, seed=6)).cache
        runner.extend(cache, random_ids(5, tiny_model.config.vocab_size, seed=7))
    finally:
        for hook in hooks:
            hook.remove()

    last = len(tiny_model.model.layers) - 1
    assert rows == {i: [1, 1] if i == last else [29, 5] for i in range(last + 1)}


def test_seeded_sampling_is_repeatable(tiny_model):
    ids = random_ids(17, tiny_model.config.vocab_size, seed=6)
    runner = Runner(tiny_model)
    prefill = runner.prefill(ids)

    def sample(sampling: Sampling) -> list[int]:
        return generate(runner, prefill.cache.clone(), prefill.logits, 12, set(), sampling)

    first = sample(Sampling(temperature=1.5, seed=7))
    assert sample(Sampling(temperature=1.5, seed=7)) == first
    assert sample(Sampling(temperature=1.5, seed=8)) != first  # 12 draws over a flat 256-way distribution
    assert sample(Sampling(temperature=0.0, seed=8)) == hf_greedy(tiny_model, ids, 12)


def test_temperature_zero_and_a_tiny_nucleus_are_argmax():
    logits = torch.randn(256, generator=torch.Generator().manual_seed(0))
    best = int(logits.argmax())

    assert next_token(logits, Sampling(temperature=0.0), None) == best
    generator = torch.Generator().manual_seed(1)
    assert {next_token(logits, Sampling(temperature=2.0, top_p=1e-6), generator) for _ in range(50)} == {best}


def test_samples_stay_inside_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two (0.5 < 0.7 <= 0.8)
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    generator = torch.Generator().manual_seed(2)

    drawn = [next_token(logits, Sampling(temperature=1.0, top_p=0.7), generator) for _ in range(300)]

    assert set(drawn) == {0, 1}
    assert 0.5 < drawn.count(0) / len(drawn) < 0.75  # renormalised: 0.5 / 0.8 = 0.625


@pytest.mark.parametrize("kwargs", [{"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_sampling_parameters_are_input_errors(kwargs):
    with pytest.raises(InputError):
        Sampling(**kwargs)


def test_appended_mask_sees_every_cached_key_and_is_causal_among_new_tokens():
    mask = appended_mask(3, 7, torch.device("cpu"))

    assert mask.shape == (3, 7)
    assert mask.dtype == torch.bool
    assert mask[:, :4].all()
    assert torch.equal(mask[:, 4:], torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))


def test_appended_mask_edge_cases():
    assert appended_mask(1, 5, torch.device("cpu")) is None  # one new token sees everything
    only_new = appended_mask(4, 4, torch.device("cpu"))  # nothing cached: plain causal
    assert torch.equal(only_new, torch.ones(4, 4, dtype=torch.bool).tril())


def bottom_right_causal_attention(q, k, v, softmax_scale, causal):
    """flash-attn's flash_attn_func contract on [batch, n, heads, d] tensors, GQA by head groups,
    with the causal mask aligned bottom-right, written with plain matmuls."""
    assert causal
    q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))  # [heads, n, d]
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    n_q, n_k = q.shape[1], k.shape[1]
    visible = torch.ones(n_q, n_k, dtype=torch.bool).tril(diagonal=n_k - n_q)
    scores = (q @ k.transpose(-1, -2) * softmax_scale).masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1).unsqueeze(0)


def test_flash_attention_layout_matches_sdpa(tiny_model):
    """The flash-attn path (CUDA only in real use) passes tensors in its layout and relies on its
    bottom-right causal mask; a plain implementation of that contract must give SDPA's results,
    for a prefill and for tokens appended to a cache."""
    ids = torch.randint(0, tiny_model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(3))
    sdpa, flash = Runner(tiny_model), Runner(tiny_model)
    flash.flash = bottom_right_causal_attention
    expected, got = sdpa.prefill(ids[:30]), flash.prefill(ids[:30])
    assert (expected.logits - got.logits).abs().max() < 1e-4
    assert (sdpa.extend(expected.cache, ids[30:]) - flash.extend(got.cache, ids[30:])).abs().max() < 1e-4
