"""Tests for core/methods and the runner's use of them: budgets per layer and KV head, TSP, scoring.

Every method runs on the tiny random-weight models of conftest.py (llama, mistral, qwen2, qwen3 and a
llama with llama3 rope scaling). The references here and in tests/helpers.py are independent of core/:
the HF model's own forward and decoder layers, and a slow loop-by-loop reading of DESIGN.md §3.
"""

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

import core.methods
from core.errors import InputError
from core.generation import generate
from core.kvcache import EMPTY
from core.methods import Budget, LayerInput, make_method
from core.methods.fastkv import FastKV
from core.methods.gemfilter import GemFilter
from core.methods.scoring import window_scores
from core.methods.snapkv import SnapKV
from core.methods.streamingllm import StreamingLLM
from core.runner import Runner
from tests.helpers import assert_same_cache, assert_top_selection, full_prefill, hf_qk, reference_window_scores

WINDOW = 8  # the methods' default scoring window
SINKS = 4  # StreamingLLM's default attention sinks
PROMPT = 200  # tokens of the compressed prompts: budgets below are well inside it
SEED = 7

# Every registered method, easiest first (kvpress style); tests take the ones their property fits.
METHODS = ["fullkv", "streamingllm", "snapkv", "adakv", "gemfilter", "fastkv"]
PROBED = ["kvzip"]  # scores with reconstruction probes, which only a build makes: tests/core/test_kvzip.py
PER_LAYER = ["streamingllm", "snapkv", "fastkv"]  # cache a budget per layer and KV head
BUDGETS = ["10%", "25%", "40"]


# --- helpers and references ---------------------------------------------------------------------


def random_ids(n: int, seed: int = SEED, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def budget_tokens(text: str, context_len: int) -> int:
    """The budget's token count with exact arithmetic: floor(context * fraction) or the constant."""
    if text.endswith("%"):
        return math.floor(Fraction(text[:-1]) / 100 * context_len)
    if "." in text:
        return math.floor(Fraction(text) * context_len)
    return int(text)


def kept_per_layer(name: str, budget: str, context_len: int, num_layers: int, tsp_rate: str = "20%") -> list[int]:
    """Tokens each layer caches per KV head: max(budget, window), capped by the tokens the layer sees."""
    count = max(budget_tokens(budget, context_len), WINDOW)
    present = [context_len] * num_layers
    if name == "fastkv":  # default tsp_layer: the middle, num_layers // 2 - 1
        tsp_layer = num_layers // 2 - 1
        propagated = max(budget_tokens(tsp_rate, context_len), budget_tokens(budget, context_len), WINDOW)
        propagated = min(propagated, context_len)
        present = [context_len if i <= tsp_layer else propagated for i in range(num_layers)]
    return [min(count, n) for n in present]


def hf_layers(model, hidden: torch.Tensor, positions: torch.Tensor, layers: range, mask=None) -> torch.Tensor:
    """Run the HF decoder layers `layers` on hidden [n, hidden] at position ids [n] -> [n, hidden].

    mask: an additive float mask [1, heads or 1, n, n] per layer index (callable), else causal.
    """
    n = hidden.shape[0]
    causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
    h = hidden[None]
    with torch.inference_mode():
        position_embeddings = model.model.rotary_emb(h, positions[None])
        for j in layers:
            out = model.model.layers[j](
                h,
                attention_mask=causal if mask is None else mask(j),
                position_ids=positions[None],
                position_embeddings=position_embeddings,
            )
            h = out[0] if isinstance(out, tuple) else out
    return h[0]


def hf_logits(model, h_last: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.lm_head(model.model.norm(h_last)).float()


def untied_count(scores: torch.Tensor, count: int, window: int = WINDOW) -> int:
    """The smallest count >= `count` whose cut falls between two different scores in every row
    (max pooling repeats a maximum over up to 7 neighbours, so ties are common there)."""
    ordered = scores.sort(dim=-1, descending=True).values
    while ((ordered[:, count - window - 1] - ordered[:, count - window]) <= 1e-6).any():
        count += 1
    return count


def reference_top(scores: torch.Tensor, count: int, window: int) -> list[list[int]]:
    """Per row: the count - window best prefix indices plus the window's, sorted. Asserts no tie at the cut."""
    rows = []
    for row in scores.tolist():
        order = sorted(range(len(row)), key=lambda i: -row[i])
        take = count - window
        if 0 < take < len(row):
            assert row[order[take - 1]] - row[order[take]] > 1e-6, "a tie at the cut: pick other random data"
        rows.append(sorted(order[:take]) + list(range(len(row), len(row) + window)))
    return rows


# --- 1. no compression is fullkv ----------------------------------------------------------------


def test_method_list_covers_the_registry():
    assert sorted(METHODS + PROBED) == sorted(core.methods.METHODS)


def test_fullkv_equals_the_hf_forward(tiny_model):
    ids = random_ids(PROMPT)
    prefill = Runner(tiny_model).prefill(ids)
    reference = full_prefill(tiny_model, ids).logits[0, -1]
    assert (prefill.logits - reference).abs().max() < 1e-4
    assert prefill.layer_tokens == [PROMPT] * len(tiny_model.model.layers)


@pytest.mark.parametrize("rate", ["100%", "1.0"])
def test_fastkv_at_full_rate_is_fullkv(tiny_model, rate):
    runner, ids = Runner(tiny_model), random_ids(PROMPT)
    full = runner.prefill(ids)
    fast = runner.prefill(ids, make_method("fastkv", budget=rate, tsp_rate=rate))
    assert (fast.logits - full.logits).abs().max() < 1e-4
    assert fast.layer_tokens == full.layer_tokens
    assert_same_cache(fast.cache, full.cache)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("length", [30, 40])
def test_no_compression_under_budget(tiny_model, name, length):
    """A prompt no longer than every budget (40 tokens, TSP 64) is prefilled exactly as fullkv."""
    options = {"fastkv": dict(budget="40", tsp_rate="64"), "fullkv": {}}.get(name, dict(budget="40"))
    runner, ids = Runner(tiny_model), random_ids(length)
    full = runner.prefill(ids)
    prefill = runner.prefill(ids, make_method(name, **options))
    assert prefill.layer_tokens == full.layer_tokens
    assert_same_cache(prefill.cache, full.cache)
    assert torch.equal(prefill.logits, full.logits)


# --- 2. budgets per layer and KV head ----------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_cache_is_stored_per_kv_head_in_position_order(tiny_model, name):
    """Whatever a method keeps: kv_heads rows (never repeat_kv'd), positions strictly increasing after
    the empty slots that may start a row (adakv), the window (last 8 prompt tokens) kept, and seq_len
    the next position."""
    config = tiny_model.config
    prefill = Runner(tiny_model).prefill(random_ids(PROMPT), make_method(name))
    cache = prefill.cache
    assert len(cache.layers) == config.num_hidden_layers
    expected_len = PROMPT if name != "gemfilter" else cache.layers[0].length
    assert cache.seq_len == expected_len
    for layer in cache.layers:
        kv_heads, n = layer.positions.shape
        assert kv_heads == config.num_key_value_heads
        assert layer.keys.shape == layer.values.shape == (kv_heads, n, config.head_dim)
        assert layer.positions.dtype == torch.long
        empty = layer.positions == EMPTY
        assert layer.padded or not empty.any()
        assert not (empty[:, 1:] & ~empty[:, :-1]).any()  # empty slots only start a row
        assert (layer.positions.diff(dim=1)[~empty[:, :-1]] > 0).all()
        assert (layer.positions[~empty] >= 0).all() and (layer.positions < cache.seq_len).all()
        window = torch.arange(cache.seq_len - WINDOW, cache.seq_len)
        assert torch.equal(layer.positions[:, -WINDOW:], window.expand(kv_heads, -1))


@pytest.mark.parametrize("name", PER_LAYER)
@pytest.mark.parametrize("budget", BUDGETS)
def test_each_layer_and_kv_head_keeps_its_budget(tiny_model, name, budget):
    runner, ids = Runner(tiny_model), random_ids(PROMPT)
    num_layers = tiny_model.config.num_hidden_layers
    full = runner.prefill(ids).cache
    prefill = runner.prefill(ids, make_method(name, budget=budget))
    expected = kept_per_layer(name, budget, PROMPT, num_layers)
    assert prefill.cache.kept_tokens_per_layer == expected
    assert expected[0] < PROMPT  # the budget really compresses
    for i, (layer, count) in enumerate(zip(prefill.cache.layers, expected, strict=True)):
        assert layer.positions.shape == (tiny_model.config.num_key_value_heads, count)
        assert (layer.positions.diff(dim=1) > 0).all()
        assert torch.equal(layer.positions[:, -WINDOW:], torch.arange(PROMPT - WINDOW, PROMPT).expand(2, -1))
        if prefill.layer_tokens[i] == PROMPT:  # computed on the whole prompt: the kept rows are fullkv's rows
            gather = layer.positions.unsqueeze(-1).expand(-1, -1, layer.keys.shape[-1])
            assert torch.equal(layer.keys, full.layers[i].keys.gather(1, gather))
            assert torch.equal(layer.values, full.layers[i].values.gather(1, gather))
    if name != "streamingllm":  # scored selections differ between the KV heads of a layer
        assert not torch.equal(prefill.cache.layers[0].positions[0], prefill.cache.layers[0].positions[1])


def test_selection_is_shared_by_the_query_heads_of_a_group():
    """A KV head's choice depends on its own query heads only: changing the other group's queries
    changes nothing in this head's row (4 query heads, 2 KV heads)."""
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(4, 120, 16, generator=gen), torch.randn(2, 120, 16, generator=gen)
    method = SnapKV(budget="20")
    keep = method.select(LayerInput(0, 4, 120, q, k)).keep
    q_other = q.clone()
    q_other[2:] = torch.randn(2, 120, 16, generator=gen)  # KV head 1's queries
    keep_other = method.select(LayerInput(0, 4, 120, q_other, k)).keep
    assert keep.shape == (2, 20)
    assert torch.equal(keep[0], keep_other[0])
    assert not torch.equal(keep[1], keep_other[1])


@pytest.mark.parametrize("pooling", ["avgpool", "maxpool"])
def test_snapkv_selection_matches_the_reference_in_every_layer(tiny_model, pooling):
    """Each layer's cache holds, per KV head, the tokens the §3 reference scores highest from that
    layer's HF queries and keys (max pooling repeats a maximum, so ties at the cut are allowed)."""
    ids, positions, count = random_ids(PROMPT), torch.arange(PROMPT), 30
    hidden = full_prefill(tiny_model, ids).hidden_states
    prefill = Runner(tiny_model).prefill(ids, make_method("snapkv", budget=str(count), pooling=pooling))
    for i, layer in enumerate(prefill.cache.layers):
        scores = reference_window_scores(*hf_qk(tiny_model, i, hidden[i][0], positions), WINDOW, pooling)
        assert layer.positions.shape == (scores.shape[0], count)
        for kept, row in zip(layer.positions.tolist(), scores.tolist(), strict=True):
            assert_top_selection(kept, row, WINDOW)
        if pooling == "avgpool":  # no ties there: exactly the reference's choice
            assert layer.positions.tolist() == reference_top(scores, count, WINDOW)


# --- 3. Token-Selective Propagation --------------------------------------------------------------


@pytest.mark.parametrize("tsp_layer", [0, 1, 2])
def test_tsp_runs_deeper_layers_on_the_selected_tokens_at_their_positions(tiny_model, tsp_layer):
    """Reference: HF's hidden states after layer t, cut to the §3 TSP selection, then HF's own deeper
    decoder layers at the original position ids."""
    ids, num_layers, kept = random_ids(PROMPT), tiny_model.config.num_hidden_layers, 20  # budget 10%
    hidden = full_prefill(tiny_model, ids).hidden_states
    q, k = hf_qk(tiny_model, tsp_layer, hidden[tsp_layer][0], torch.arange(PROMPT))
    defaults = FastKV()
    scores = reference_window_scores(q, k, WINDOW, defaults.pooling, defaults.tsp_kernel).sum(0, keepdim=True)
    propagated = untied_count(scores, 50)  # about 25%
    selected = torch.tensor(reference_top(scores, propagated, WINDOW)[0])

    method = make_method("fastkv", budget="10%", tsp_rate=str(propagated), tsp_layer=tsp_layer)
    prefill = Runner(tiny_model).prefill(ids, method)
    assert prefill.layer_tokens == [PROMPT] * (tsp_layer + 1) + [propagated] * (num_layers - tsp_layer - 1)

    deeper = range(tsp_layer + 1, num_layers)
    h = hf_layers(tiny_model, hidden[tsp_layer + 1][0][selected], selected, deeper)
    reference = hf_logits(tiny_model, h[-1])
    assert (prefill.logits - reference).abs().max() < 1e-4
    full_logits = Runner(tiny_model).prefill(ids).logits
    assert (prefill.logits - full_logits).abs().max() > 1e-3  # TSP changed the computation

    for i, layer in enumerate(prefill.cache.layers):
        assert layer.length == kept
        if i > tsp_layer:
            assert torch.isin(layer.positions, selected).all()
    # the deeper layers' cached keys and values are those of the selected tokens' own computation
    h = hidden[tsp_layer + 1][0][selected]
    for j in deeper:
        layer = prefill.cache.layers[j]
        _, k = hf_qk(tiny_model, j, h, selected)
        index = torch.searchsorted(selected, layer.positions)  # [kv_heads, kept] rows of the subset
        expected = k.gather(1, index.unsqueeze(-1).expand(-1, -1, k.shape[-1]))
        assert (layer.keys - expected).abs().max() < 1e-4
        h = hf_layers(tiny_model, h, selected, range(j, j + 1))


def test_fastkv_tsp_layer_past_the_last_layer_is_refused_on_prefill(tiny_model):
    num_layers = tiny_model.config.num_hidden_layers
    method = make_method("fastkv", tsp_layer=num_layers)
    with pytest.raises(InputError, match="past the model's last layer"):
        Runner(tiny_model).prefill(random_ids(PROMPT), method)
    Runner(tiny_model).prefill(random_ids(PROMPT), make_method("fastkv", tsp_layer=num_layers - 1))


# --- 4. scoring and selection against the slow reference --------------------------------------


@pytest.mark.parametrize("pooling", ["avgpool", "maxpool"])
@pytest.mark.parametrize(("n", "window", "kernel"), [(60, 8, 7), (150, 8, 7), (40, 4, 5)])
def test_window_scores_match_the_reference(pooling, n, window, kernel):
    gen = torch.Generator().manual_seed(n + kernel)
    q, k = 1.5 * torch.randn(8, n, 16, generator=gen), torch.randn(2, n, 16, generator=gen)
    scores = window_scores(q, k, window, pooling, kernel)
    expected = reference_window_scores(q, k, window, pooling, kernel)
    assert scores.shape == (2, n - window)
    assert scores.dtype == torch.float32
    assert (scores.double() - expected).abs().max() < 1e-5
    # only the window's queries matter
    assert torch.equal(window_scores(q[:, -window:], k, window, pooling, kernel), scores)


def test_avgpool_counts_the_zero_padding_and_maxpool_takes_the_real_neighbours():
    """At the first prefix key the average divides by the full kernel (torch's count_include_pad), the
    max is over the 4 real keys within reach; each per query head, then summed over the group."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 30, 16, generator=gen), torch.randn(1, 30, 16, generator=gen)
    logits = (q[:, -WINDOW:] @ k[0].T) / 4
    logits[..., -WINDOW:] = logits[..., -WINDOW:].masked_fill(torch.ones(WINDOW, WINDOW).triu(1).bool(), float("-inf"))
    summed = logits.softmax(-1).sum(1)[:, : 30 - WINDOW]  # [heads, prefix]
    avg = window_scores(q, k, WINDOW, "avgpool")[0, 0]
    assert torch.allclose(avg, summed[:, :4].sum() / 7)
    top = window_scores(q, k, WINDOW, "maxpool")[0, 0]
    assert torch.allclose(top, summed[:, :4].max(1).values.sum())


@pytest.mark.parametrize("pooling", ["avgpool", "maxpool"])
@pytest.mark.parametrize(("n", "count", "tsp_count"), [(90, 20, 40), (150, 12, 60)])
def test_layer_and_tsp_selection_match_the_reference(pooling, n, count, tsp_count):
    gen = torch.Generator().manual_seed(n + count)
    q, k = 1.5 * torch.randn(8, n, 16, generator=gen), torch.randn(2, n, 16, generator=gen)
    layer = LayerInput(0, 4, n, q, k)
    scores = reference_window_scores(q, k, WINDOW, pooling)
    count = untied_count(scores, count)
    expected_keep = reference_top(scores, count, WINDOW)
    tsp_scores = reference_window_scores(q, k, WINDOW, pooling, kernel=FastKV.tsp_kernel).sum(0, keepdim=True)
    tsp_count = untied_count(tsp_scores, tsp_count)
    expected_tsp = reference_top(tsp_scores, tsp_count, WINDOW)[0]

    snap = SnapKV(budget=str(count), pooling=pooling).select(layer)
    assert snap.keep.tolist() == expected_keep
    assert snap.propagate is None and snap.restart is None
    fast = FastKV(budget=str(count), tsp_rate=str(tsp_count), tsp_layer=0, pooling=pooling).select(layer)
    assert fast.keep.tolist() == expected_keep
    assert fast.propagate.tolist() == expected_tsp
    assert fast.restart is None
    # not the TSP layer: no propagation; a proportional budget counts the whole prompt
    deeper = FastKV(budget="10%", tsp_layer=0, pooling=pooling).select(LayerInput(1, 4, 10 * count, q, k))
    assert deeper.propagate is None
    assert deeper.keep.tolist() == expected_keep


# --- 5. exact-prefill methods do not change the logits -----------------------------------------


@pytest.mark.parametrize("name", [name for name in METHODS if core.methods.METHODS[name].needs_full_prefill])
def test_full_prefill_methods_compress_only_the_cache(tiny_model, name):
    runner, ids = Runner(tiny_model), random_ids(PROMPT)
    full = runner.prefill(ids)
    prefill = runner.prefill(ids, make_method(name, budget="10%"))
    assert (prefill.logits - full.logits).abs().max() < 1e-6
    assert prefill.layer_tokens == full.layer_tokens
    assert prefill.cache.kept_tokens_per_layer == [20] * tiny_model.config.num_hidden_layers


# --- 6. GemFilter ------------------------------------------------------------------------------


def reference_gemfilter_selection(model, ids, filter_layer: int, count: int, kernel: int = 5) -> torch.Tensor:
    """The last query's dot products with every key, summed over heads, avg-pooled; top prefix + window."""
    hidden = full_prefill(model, ids).hidden_states[filter_layer][0]
    q, k = hf_qk(model, filter_layer, hidden, torch.arange(ids.shape[0]))
    group = q.shape[0] // k.shape[0]
    inner = sum(k[head // group] @ q[head, -1] for head in range(q.shape[0]))  # [n]
    pooled = F.avg_pool1d(inner[None, None], kernel, stride=1, padding=kernel // 2)[0, 0]
    return torch.tensor(reference_top(pooled[None, : ids.shape[0] - WINDOW], count, WINDOW)[0])


@pytest.mark.parametrize(("budget", "filter_layer"), [("10%", None), ("40", 0), ("25%", 2)])
def test_gemfilter_reprefills_the_selected_tokens_at_fresh_positions(tiny_model, budget, filter_layer):
    runner, ids = Runner(tiny_model), random_ids(PROMPT)
    num_layers = tiny_model.config.num_hidden_layers
    layer = num_layers // 2 - 1 if filter_layer is None else filter_layer
    count = max(budget_tokens(budget, PROMPT), WINDOW)
    prefill = runner.prefill(ids, make_method("gemfilter", budget=budget, filter_layer=filter_layer))

    assert prefill.cache.seq_len == count
    assert prefill.layer_tokens == [PROMPT] * (layer + 1) + [count] * num_layers
    for cached in prefill.cache.layers:
        assert torch.equal(cached.positions, torch.arange(count).expand(tiny_model.config.num_key_value_heads, -1))

    selected = reference_gemfilter_selection(tiny_model, ids, layer, count)
    again = runner.prefill(ids[selected])
    assert_same_cache(prefill.cache, again.cache)
    reference = full_prefill(tiny_model, ids[selected]).logits[0, -1]
    assert (prefill.logits - reference).abs().max() < 1e-4


# --- 7. StreamingLLM ---------------------------------------------------------------------------


@pytest.mark.parametrize("budget", ["10%", "25%", "40", "12"])
def test_streamingllm_keeps_the_sinks_and_the_most_recent_tokens(tiny_model, budget):
    count = max(budget_tokens(budget, PROMPT), WINDOW)
    prefill = Runner(tiny_model).prefill(random_ids(PROMPT), make_method("streamingllm", budget=budget))
    expected = list(range(SINKS)) + list(range(PROMPT - (count - SINKS), PROMPT))
    for layer in prefill.cache.layers:
        assert layer.positions.tolist() == [expected] * tiny_model.config.num_key_value_heads


def test_streamingllm_with_room_for_fewer_sinks_keeps_the_first_ones():
    k, q = torch.zeros(2, 100, 16), torch.zeros(4, 100, 16)  # recency needs no scores
    keep = StreamingLLM(budget="10").select(LayerInput(0, 4, 100, q, k)).keep  # room for 2 sinks + window
    assert keep.tolist() == [[0, 1, *range(92, 100)]] * 2


# --- 8. bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10%", Budget(0.1, proportional=True)),
        ("0.1", Budget(0.1, proportional=True)),
        ("100%", Budget(1.0, proportional=True)),
        ("1.0", Budget(1.0, proportional=True)),
        ("1024", Budget(1024, proportional=False)),
        (" 25% ", Budget(0.25, proportional=True)),
    ],
)
def test_budget_parse(text, expected):
    budget = Budget.parse(text)
    assert budget == expected
    assert Budget.parse(budget) is budget
    assert budget.tokens(2000) == budget_tokens(text.strip(), 2000)


@pytest.mark.parametrize("text", ["0", "0%", "0.0", "150%", "1.5", "abc", "-5", "-10%", "", "10 tokens", "1e3"])
def test_budget_parse_rejects(text):
    with pytest.raises(InputError):
        Budget.parse(text)


def test_proportional_budget_is_exact():
    for percent in range(1, 101):
        for context_len in (100, 180, 200, 1000, 2900):
            assert Budget.parse(f"{percent}%").tokens(context_len) == percent * context_len // 100


def test_make_method_builds_each_registered_method():
    for name in METHODS:
        method = make_method(name, tsp_layer=None, budget=None)  # None: an option the user did not give
        assert method.name == name and isinstance(method, core.methods.METHODS[name])
    method = make_method("fastkv", budget="1024", tsp_layer=3, tsp_rate="20%")
    assert (method.budget, method.tsp_layer, method.tsp_rate) == (Budget(1024, False), 3, Budget(0.2, True))


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("h2o", {}),
        ("FastKV", {}),
        ("fullkv", dict(tsp_layer=3)),
        ("fullkv", dict(budget="10%")),
        ("snapkv", dict(tsp_rate="20%")),
        ("streamingllm", dict(tsp_layer=1)),
        ("gemfilter", dict(tsp_rate="20%")),
        ("fastkv", dict(filter_layer=1)),
        ("fastkv", dict(budget="abc")),
        ("fastkv", dict(tsp_rate="0%")),
        ("fastkv", dict(tsp_layer=-1)),
        ("fastkv", dict(tsp_kernel=4)),
        ("gemfilter", dict(filter_layer=-1)),
    ],
)
def test_make_method_rejects(name, options):
    with pytest.raises(InputError):
        make_method(name, **options)


@pytest.mark.parametrize("name", ["snapkv", "fastkv", "streamingllm"])
@pytest.mark.parametrize("options", [dict(pooling="meanpool"), dict(kernel=4), dict(kernel=0), dict(window=0)])
def test_bad_scoring_options_raise(name, options):
    with pytest.raises(InputError):
        make_method(name, **options)


@pytest.mark.parametrize("kernel", [4, 0])
def test_gemfilter_bad_kernel_raises(kernel):
    with pytest.raises(InputError):
        GemFilter(kernel=kernel)


def test_filter_layer_past_the_last_layer_is_refused_on_prefill(tiny_model):
    method = make_method("gemfilter", filter_layer=tiny_model.config.num_hidden_layers)
    with pytest.raises(InputError, match="past the model's last layer"):
        Runner(tiny_model).prefill(random_ids(PROMPT), method)


# --- 9. decoding after compression -------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_decoded_tokens_continue_from_the_true_context_length(tiny_model, name):
    runner = Runner(tiny_model)
    prefill = runner.prefill(random_ids(120), make_method(name, **({} if name == "fullkv" else dict(budget="25%"))))
    start = prefill.cache.seq_len  # the context length (gemfilter: its re-prefilled token count)
    assert start == (120 if name != "gemfilter" else 30)
    before = [layer.positions.clone() for layer in prefill.cache.layers]
    tokens = generate(runner, prefill.cache, prefill.logits, max_new_tokens=5, stop_ids=set())
    assert len(tokens) == 5
    appended = 4  # the last token is returned, not yet fed back
    assert prefill.cache.seq_len == start + appended
    for layer, positions in zip(prefill.cache.layers, before, strict=True):
        heads = positions.shape[0]
        assert torch.equal(layer.positions[:, :-appended], positions)
        assert torch.equal(layer.positions[:, -appended:], torch.arange(start, start + appended).expand(heads, -1))
        assert layer.keys.shape[1] == layer.values.shape[1] == positions.shape[1] + appended


def test_fullkv_decoding_equals_hf_greedy(tiny_model):
    runner, ids = Runner(tiny_model), random_ids(100)
    prefill = runner.prefill(ids)
    tokens = generate(runner, prefill.cache, prefill.logits, max_new_tokens=6, stop_ids=set())
    sequence = ids
    for _ in range(6):
        next_id = full_prefill(tiny_model, sequence).logits[0, -1].argmax()
        sequence = torch.cat([sequence, next_id[None]])
    assert tokens == sequence[100:].tolist()


@pytest.mark.parametrize("name", [name for name in METHODS if core.methods.METHODS[name].needs_full_prefill])
def test_decoding_over_a_compressed_cache_matches_a_masked_full_forward(tiny_model, name):
    """The next token at position L attends to each KV head's kept tokens plus itself; reference: HF's
    layers over all L + 1 tokens (the context's rows are exact after a full prefill) with the last
    row masked per head to that layer's kept positions."""
    runner, ids = Runner(tiny_model), random_ids(PROMPT)
    prefill = runner.prefill(ids, make_method(name, budget="10%"))
    token = int(prefill.logits.argmax())
    kept = [layer.positions.clone() for layer in prefill.cache.layers]
    logits = runner.extend(prefill.cache, torch.tensor([token]))

    heads, n = tiny_model.config.num_attention_heads, PROMPT + 1
    group = heads // tiny_model.config.num_key_value_heads

    def mask(j: int) -> torch.Tensor:
        additive = torch.full((1, heads, n, n), float("-inf")).triu(1)
        additive[0, :, -1] = float("-inf")
        for head in range(heads):
            additive[0, head, -1, kept[j][head // group]] = 0
        additive[0, :, -1, -1] = 0
        return additive

    sequence = torch.cat([ids, torch.tensor([token])])
    with torch.inference_mode():
        embedded = tiny_model.model.embed_tokens(sequence)
    h = hf_layers(tiny_model, embedded, torch.arange(n), range(tiny_model.config.num_hidden_layers), mask)
    assert (logits - hf_logits(tiny_model, h[-1])).abs().max() < 1e-4
    assert (logits - full_prefill(tiny_model, sequence).logits[0, -1]).abs().max() > 1e-3  # the cache mattered
