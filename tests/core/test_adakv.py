"""Head-adaptive budgets (AdaKV): the selection against a slow reference, the budgets it keeps per layer
and head, caches whose heads keep different numbers of tokens (empty slots), saved and loaded."""

import math

import pytest
import torch

from core.generation import Decoding
from core.kvcache import EMPTY, KVCache
from core.methods import make_method
from core.methods.adaptive import HEAD_CAP, HEAD_FLOOR, adaptive_top_tokens
from core.options import BuildPlan
from core.runner import Runner, per_head_mask
from core.storage import load_cache, read_manifest, save_cache
from tests.helpers import assert_one_line_error, assert_same_cache, fastkv, make_document, random_ids

PROMPT, WINDOW = 200, 8


def reference_adaptive(scores: torch.Tensor, count: int, window: int) -> list[set[int]]:
    """AdaKV's allocation written plainly: each head's HEAD_CAP x budget best tokens are its candidates, its
    HEAD_FLOOR x budget best are taken, then the best remaining candidates of all heads fill the layer's
    budget; every head also keeps the window."""
    heads, prefix = scores.shape
    per_head = count - window
    widest = min(math.ceil(HEAD_CAP * per_head), prefix)
    floor = int(HEAD_FLOOR * per_head)
    ranked = [sorted(range(prefix), key=lambda t: -scores[h, t].item())[:widest] for h in range(heads)]
    taken = [set(ranked[h][:floor]) for h in range(heads)]
    rest = sorted(((scores[h, t].item(), h, t) for h in range(heads) for t in ranked[h][floor:]), reverse=True)
    for _, h, t in rest[: heads * per_head - heads * floor]:
        taken[h].add(t)
    return [chosen | set(range(prefix, prefix + window)) for chosen in taken]


@pytest.mark.parametrize(("heads", "prefix", "count", "window"), [(2, 100, 20, 4), (3, 50, 30, 8), (4, 64, 9, 1)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adaptive_selection_matches_the_reference(heads, prefix, count, window, seed):
    gen = torch.Generator().manual_seed(seed)
    # skewed per head: some heads attend sharply, others diffusely
    scores = torch.rand(heads, prefix, generator=gen) ** torch.linspace(1, 6, heads).unsqueeze(1)
    index = adaptive_top_tokens(scores, count, window)
    rows = [set(row[row != EMPTY].tolist()) for row in index]
    assert rows == reference_adaptive(scores, count, window)
    for row in index:  # empty slots first, then tokens in increasing order
        real = row[row != EMPTY]
        assert (row[: len(row) - len(real)] == EMPTY).all() and (real.diff() > 0).all()


def test_heads_that_attend_sharply_give_their_budget_to_diffuse_ones():
    sharp = torch.zeros(100)
    sharp[:5] = 1.0
    diffuse = torch.full((100,), 0.1)
    kept = [int((row != EMPTY).sum()) for row in adaptive_top_tokens(torch.stack([sharp, diffuse]), 24, 4)]
    assert kept[0] < kept[1] and sum(kept) == 2 * 24


@pytest.mark.parametrize("budget", ["10%", "25%", "60"])
def test_head_budgets_add_up_to_the_layer_budget_within_floor_and_cap(tiny_model, budget):
    runner, ids = Runner(tiny_model), random_ids(PROMPT, tiny_model.config.vocab_size, seed=7)
    method = make_method("adakv", budget=budget).for_question(WINDOW)
    full = runner.prefill(ids).cache
    cache = runner.prefill(ids, method).cache
    count = max(method.budget.tokens(PROMPT), WINDOW)
    per_head = count - WINDOW
    kv_heads = tiny_model.config.num_key_value_heads
    differs = False
    for layer, reference in zip(cache.layers, full.layers, strict=True):
        kept = (layer.positions != EMPTY).sum(dim=-1)
        assert int(kept.sum()) == kv_heads * count  # the layer's budget, shared
        assert (kept >= WINDOW + int(HEAD_FLOOR * per_head)).all()
        assert (kept <= WINDOW + math.ceil(HEAD_CAP * per_head)).all()
        assert layer.kept == count
        differs |= bool((kept != count).any())
        for head in range(kv_heads):
            positions = layer.positions[head][layer.positions[head] != EMPTY]
            assert torch.equal(positions[-WINDOW:], torch.arange(PROMPT - WINDOW, PROMPT))  # the window, always
            # each kept token's key and value, at its original position (GQA: one row per KV head)
            assert torch.equal(layer.keys[head, -len(positions) :], reference.keys[head, positions])
            assert torch.equal(layer.values[head, -len(positions) :], reference.values[head, positions])
            assert not layer.keys[head, : layer.length - len(positions)].any()
    assert differs  # heads of these random models do keep different numbers of tokens


def fill_empty_slots(cache: KVCache, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for layer in cache.layers:
        empty = (layer.positions == EMPTY).unsqueeze(-1)
        for buffer in layer.buffers[:2]:
            noise = 100 * torch.randn(buffer[:, : layer.length].shape, generator=gen)
            buffer[:, : layer.length] = torch.where(empty, noise, buffer[:, : layer.length])


def test_empty_slots_are_invisible_to_attention_and_scoring(tiny_model):
    runner, ids = Runner(tiny_model), random_ids(PROMPT, tiny_model.config.vocab_size, seed=3)
    question = torch.tensor([5, 6, 7, 8])
    cache = runner.prefill(ids, make_method("adakv", budget="20%").for_question(WINDOW)).cache
    assert any(layer.padded for layer in cache.layers)
    garbage = cache.clone()
    fill_empty_slots(garbage, seed=1)
    reselect = make_method("adakv", budget="10%").for_question(len(question))  # a two-stage query
    clean_logits = runner.extend(cache, question, reselect)
    garbage_logits = runner.extend(garbage, question, reselect)
    assert torch.equal(clean_logits, garbage_logits)
    assert all(torch.equal(a.positions, b.positions) for a, b in zip(cache.layers, garbage.layers, strict=True))
    token = torch.tensor([int(clean_logits.argmax())])
    assert torch.equal(runner.extend(cache, token), runner.extend(garbage, token))  # a decode step


def test_per_head_mask_matches_attention_over_each_heads_own_tokens(tiny_model):
    """SDPA with the mask equals, for every query head, softmax attention over only the tokens its KV
    head holds (query head h reads KV head h // group)."""
    runner, gen = Runner(tiny_model), torch.Generator().manual_seed(5)
    heads, kv_heads, d = runner.num_heads, runner.num_kv_heads, runner.head_dim
    group, n_keys, n_new = heads // kv_heads, 30, 3
    q, k, v = torch.randn(heads, n_new, d, generator=gen), *torch.randn(2, kv_heads, n_keys, d, generator=gen)
    valid = torch.ones(kv_heads, n_keys, dtype=torch.bool)
    valid[0, :7], valid[1, :2] = False, False
    causal = torch.ones(n_new, n_keys, dtype=torch.bool)
    causal[:, -n_new:] = torch.ones(n_new, n_new, dtype=torch.bool).tril()
    mask = per_head_mask(valid, group, causal)
    got = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    for h in range(heads):
        kv = h // group
        for i in range(n_new):
            seen = valid[kv] & causal[i]
            weights = (q[h, i] @ k[kv, seen].T / d**0.5).softmax(-1)
            torch.testing.assert_close(got[h, i], weights @ v[kv, seen])


PAGES = [" ".join(f"In {1800 + i} the keeper logged {i} ships and {i % 7} storms." for i in range(12))]


@pytest.mark.parametrize("storage", ["float32", "int8"])
def test_a_head_adaptive_cache_saves_loads_and_answers_as_in_memory(engine, tmp_path, storage):
    method = make_method("adakv", budget="20%", window=8)
    saved = engine.build([make_document(PAGES)], BuildPlan(method), reserved=128)
    assert any(layer.padded for layer in saved.cache.layers)
    path = tmp_path / "ada.fkv"
    save_cache(path, saved.cache, saved.manifest, storage)
    cache, manifest = load_cache(path, "cpu", torch.float32)
    assert read_manifest(path) == manifest and manifest.method.name == "adakv"
    for loaded, original in zip(cache.layers, saved.cache.layers, strict=True):
        assert torch.equal(loaded.positions, original.positions) and loaded.padded == original.padded
    if storage == "float32":
        assert_same_cache(cache, saved.cache)
        decoding = Decoding(max_new_tokens=6)
        from_file = engine.query(type(saved)(cache, manifest, saved.stats), "When?", decoding=decoding)
        assert from_file.text == engine.query(saved, "When?", decoding=decoding).text


def test_adakv_from_the_cli_answers_and_an_option_it_does_not_take_exits_2(tiny_model_folder, tmp_path):
    document = tmp_path / "doc.txt"
    document.write_text(PAGES[0])
    model = str(tiny_model_folder.path)
    result = fastkv("ask", document, "When?", "--method", "adakv", "--budget", "20%", "--model", model,
                    "--max-new-tokens", "3", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert '"method": "adakv"' in result.stdout
    assert_one_line_error(
        fastkv("ask", document, "When?", "--method", "adakv", "--tsp-rate", "20%", "--model", model),
        "--tsp-rate does not apply to --method adakv",
    )
