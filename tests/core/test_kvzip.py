"""KVzip: reconstruction probes score exactly as the model's own attention over context + repeat, never change
the context's own prefill, and the budgets (uniform, adaptive, global) and TSP keep what they say."""

from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch

from core.errors import InputError
from core.kvcache import EMPTY
from core.methods import LayerInput, Selection, make_method
from core.methods.adaptive import HEAD_FLOOR
from core.methods.kvzip import KVzip
from core.reconstruction import (
    Probe,
    attention_with_logsumexp,
    blocked_attention_with_logsumexp,
    probe_attention,
    probes_for,
)
from core.runner import ProbeRun, Runner
from tests.helpers import random_ids

TOL = 1e-4  # fp32


@dataclass
class ScoreRecorder(KVzip):
    """Keeps everything, and records each layer's reconstruction scores."""

    name: ClassVar[str] = "score-recorder"
    seen: list = field(default_factory=list, repr=False)

    def select(self, layer: LayerInput) -> Selection:
        self.seen.append(layer.reconstruction)
        return Selection()


def repeat_probe(ids: torch.Tensor, prompt: list[int], start: int = 0) -> Probe:
    """A probe of `prompt` then `ids`, the context's tokens from `start` on, as probes_for makes them."""
    source = torch.cat([torch.full((len(prompt),), -1), torch.arange(start, start + ids.shape[0])])
    return Probe(torch.cat([torch.tensor(prompt), ids]), source)


def hf_probe_scores(model, ids: torch.Tensor, probe: Probe) -> list[torch.Tensor]:
    """Per layer [kv_heads, n]: the model's own eager attention over context + probe as one sequence, the
    probe's rows over the context's columns, maxed over the queries and each GQA group."""
    n, config = ids.shape[0], model.config
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(torch.cat([ids, probe.ids]).unsqueeze(0), output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    group = config.num_attention_heads // config.num_key_value_heads
    return [a[0, :, n:, :n].amax(dim=1).view(config.num_key_value_heads, group, n).amax(dim=1) for a in out.attentions]


def test_probe_scores_equal_the_models_attention_over_context_and_repeat(tiny_model):
    ids = random_ids(40, tiny_model.config.vocab_size, seed=3)
    first, second = repeat_probe(ids[:25], [5, 6, 7], start=0), repeat_probe(ids[25:], [5, 6], start=25)
    recorder = ScoreRecorder(budget="100%")

    Runner(tiny_model).prefill(ids, recorder, probes=[first, second])

    expected_first, expected_second = hf_probe_scores(tiny_model, ids, first), hf_probe_scores(tiny_model, ids, second)
    assert len(recorder.seen) == tiny_model.config.num_hidden_layers
    for got, want_first, want_second in zip(recorder.seen, expected_first, expected_second, strict=True):
        assert got.shape == want_first.shape
        assert (got[:, :25] - want_first[:, :25]).abs().max() < TOL  # each key scored by the probe repeating it
        assert (got[:, 25:] - want_second[:, 25:]).abs().max() < TOL


def test_probes_never_change_the_contexts_own_prefill(tiny_model):
    ids = random_ids(33, tiny_model.config.vocab_size, seed=4)
    runner = Runner(tiny_model)
    probes = [repeat_probe(ids[:16], [9]), repeat_probe(ids[16:], [9, 10], start=16)]

    plain = runner.prefill(ids)
    probed = runner.prefill(ids, make_method("kvzip", budget="100%"), probes=probes)

    assert torch.equal(plain.logits, probed.logits)
    for a, b in zip(plain.cache.layers, probed.cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_probe_attention_output_equals_sdpa_and_blocks_change_nothing(monkeypatch):
    torch.manual_seed(0)
    heads, kv_heads, n, m, d = 4, 2, 50, 30, 8
    q, k, v = torch.randn(heads, m, d), torch.randn(kv_heads, n + m, d), torch.randn(kv_heads, n + m, d)
    mask = torch.ones(m, n + m, dtype=torch.bool)
    mask[:, n:] = torch.ones(m, m, dtype=torch.bool).tril()

    output, scores = probe_attention(q, k, v, n, slice(0, n), d**-0.5)
    monkeypatch.setattr("core.reconstruction.QUERY_BLOCK", 7)
    blocked_output, blocked_scores = probe_attention(q, k, v, n, slice(0, n), d**-0.5)
    _, part = probe_attention(q, k, v, n, slice(10, 30), d**-0.5)

    expected = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, enable_gqa=True
    )[0]
    assert (output - expected).abs().max() < 1e-5
    assert torch.allclose(blocked_output, output, atol=1e-6) and torch.allclose(blocked_scores, scores, atol=1e-6)
    assert scores.shape == (kv_heads, n) and bool((scores > 0).all()) and bool((scores <= 1).all())
    assert torch.allclose(part, scores[:, 10:30], atol=1e-6)
    weights = (q @ k.repeat_interleave(2, 0).transpose(-1, -2) * d**-0.5).masked_fill(~mask, float("-inf")).softmax(-1)
    assert torch.allclose(scores, weights[..., :n].amax(dim=1).view(kv_heads, 2, n).amax(dim=1), atol=1e-6)


def test_the_blocked_attention_equals_the_kernels_output_and_logsumexp(monkeypatch):
    torch.manual_seed(1)
    heads, n, m, d = 4, 40, 24, 8
    q, k, v = torch.randn(heads, m, d), torch.randn(heads, n + m, d), torch.randn(heads, n + m, d)
    future = torch.ones(m, m, dtype=torch.bool).triu(1)
    mask = torch.zeros(m, n + m)
    mask[:, n:] = mask[:, n:].masked_fill(future, float("-inf"))
    monkeypatch.setattr("core.reconstruction.QUERY_BLOCK", 5)

    output, lse = attention_with_logsumexp(q, k, v, future, d**-0.5)
    blocked_output, blocked_lse = blocked_attention_with_logsumexp(q, k, v, mask, d**-0.5)

    logits = (q @ k.transpose(-1, -2) * d**-0.5 + mask).logsumexp(dim=-1)
    assert (lse - logits).abs().max() < 1e-5 and (blocked_lse - logits).abs().max() < 1e-5
    assert (output - blocked_output).abs().max() < 1e-5


def test_probes_repeat_every_context_token_once_in_chunks(tiny_tokenizer):
    from core.prompt import PromptTemplate

    template = PromptTemplate.for_tokenizer(tiny_tokenizer)
    context = list(range(3, 3 + 25))

    probes = probes_for(tiny_tokenizer, template, context, chunk=10)

    repeated = torch.cat([p.source[p.source >= 0] for p in probes])
    assert torch.equal(repeated, torch.arange(25))
    assert [int((p.source >= 0).sum()) for p in probes] == [10, 10, 5]
    for probe in probes:
        copied = probe.source >= 0
        assert probe.ids[copied].tolist() == [context[s] for s in probe.source[copied].tolist()]
        assert bool((probe.source[: int((~copied).sum())] < 0).all())  # the prompt comes first


def test_uniform_budget_keeps_each_heads_best_scored_tokens(tiny_model):
    ids = random_ids(60, tiny_model.config.vocab_size, seed=5)
    probe = repeat_probe(ids, [3])
    runner = Runner(tiny_model)
    recorder = ScoreRecorder(budget="100%")
    runner.prefill(ids, recorder, probes=[probe])

    cache = runner.prefill(ids, KVzip(budget=20, window=4, head_budget="uniform"), probes=[probe]).cache

    for layer, scores in zip(cache.layers, recorder.seen, strict=True):
        assert layer.length == 20
        for head in range(layer.positions.shape[0]):
            kept = layer.positions[head].tolist()
            assert kept[-4:] == [56, 57, 58, 59]
            best = scores[head, :56].topk(16).indices.sort().values.tolist()
            assert kept[:16] == best


def test_global_budget_keeps_the_caches_best_pairs_within_each_heads_floor(tiny_model):
    config = tiny_model.config
    ids = random_ids(80, config.vocab_size, seed=6)
    probe = repeat_probe(ids, [3])
    runner = Runner(tiny_model)
    recorder = ScoreRecorder(budget="100%")
    runner.prefill(ids, recorder, probes=[probe])
    method = KVzip(budget=24, window=4, head_budget="global")

    cache = runner.prefill(ids, method, probes=[probe]).cache

    per_head, total = 20, 20 * config.num_hidden_layers * config.num_key_value_heads
    kept = [(layer.positions[h] != EMPTY).sum() - 4 for layer in cache.layers for h in range(layer.positions.shape[0])]
    assert abs(int(sum(kept)) - total) <= len(kept)  # ties at the threshold, floors and caps
    assert min(int(k) for k in kept) >= int(HEAD_FLOOR * per_head)
    pool = torch.cat([s[:, :76].flatten() for s in recorder.seen])
    threshold = pool.topk(total).values[-1]
    for layer, scores in zip(cache.layers, recorder.seen, strict=True):
        for h in range(layer.positions.shape[0]):
            positions = layer.positions[h][layer.positions[h] != EMPTY][:-4]
            dropped = torch.ones(76, dtype=torch.bool)
            dropped[positions] = False
            assert bool((scores[h, :76][dropped] <= threshold).all())


def test_tsp_runs_deeper_layers_and_the_probes_on_the_selected_tokens(tiny_model):
    layers = tiny_model.config.num_hidden_layers
    ids = random_ids(64, tiny_model.config.vocab_size, seed=7)
    method = KVzip(budget=16, tsp_rate=24, tsp_layer=0, window=4, head_budget="uniform")

    prefill = Runner(tiny_model).prefill(ids, method, probes=[repeat_probe(ids, [3])])

    assert prefill.layer_tokens == [64] + [24] * (layers - 1)
    assert method.reconstruction_depth(64, layers) == layers  # deeper layers still choose 16 of 24
    assert KVzip(budget=24, tsp_rate=24, tsp_layer=0, head_budget="uniform").reconstruction_depth(64, layers) == 1
    assert KVzip(budget=24, tsp_rate=24, tsp_layer=0).reconstruction_depth(64, layers) == layers  # global: all
    for layer in prefill.cache.layers:
        assert layer.length == 16


def test_a_probe_follows_the_tokens_tsp_propagates():
    probe = ProbeRun(
        torch.arange(7.0)[:, None], torch.arange(10, 17), torch.tensor([-1, -1, 0, 1, 2, 3, 4]),
        torch.zeros(7, 2), torch.zeros(7, 2),
    )  # fmt: skip

    following = probe.following(torch.tensor([1, 3]), seq_len=10)

    assert following.source.tolist() == [-1, -1, 1, 3]
    assert following.positions.tolist() == [10, 11, 13, 15]


def test_kvzip_is_refused_where_it_has_no_probes(tiny_model):
    ids = random_ids(20, tiny_model.config.vocab_size, seed=8)
    with pytest.raises(InputError, match="reconstruction"):
        Runner(tiny_model).prefill(ids, KVzip(budget=8))
    with pytest.raises(InputError, match="head-budget"):
        KVzip(head_budget="sideways")
