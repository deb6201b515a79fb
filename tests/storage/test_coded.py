"""Coded storage: the rANS coder (core/storage/rans.py), rows of codes (core/storage/coded.py), coded .fkv files and
their refusals."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.errors import CacheFileError, InputError
from core.storage import coded, load_cache, rans, save_cache
from core.storage.quant import dequantize, quantize
from tests.storage.rewrite import refusal, rewrite_manifest, rewrite_tensors, update

# --- the coder ------------------------------------------------------------------------------------------


def random_lanes(seed: int, lanes: int, steps: int, alphabet: int, tables: int):
    """Symbols drawn from a few peaked distributions, their lanes' tables and the frequencies of their counts."""
    generator = torch.Generator().manual_seed(seed)
    probabilities = torch.softmax(torch.randn(tables, alphabet, generator=generator) * 3, 1)
    lane_tables = torch.randint(0, tables, (lanes,), generator=generator)
    symbols = torch.multinomial(probabilities[lane_tables], steps, replacement=True, generator=generator).T
    counts = torch.zeros(tables, alphabet, dtype=torch.int64)
    counts.index_put_((lane_tables.expand_as(symbols), symbols), torch.ones_like(symbols), accumulate=True)
    return symbols.contiguous(), lane_tables, rans.frequencies(counts)  # symbols [steps, lanes]


def entropy_bits(symbols: torch.Tensor, lane_tables: torch.Tensor) -> float:
    """Bits of the symbols under each table's own empirical distribution."""
    total = 0.0
    for table in lane_tables.unique():
        counts = torch.bincount(symbols[:, lane_tables == table].reshape(-1)).double()
        p = counts[counts > 0] / counts.sum()
        total += float(-(p * p.log2()).sum() * counts.sum())
    return total


@pytest.mark.parametrize("lanes, steps, alphabet, tables", [(1, 1, 2, 1), (7, 300, 512, 3), (200, 64, 40, 5)])
def test_rans_round_trips_every_symbol_in_about_their_entropy(lanes, steps, alphabet, tables):
    symbols, lane_tables, freqs = random_lanes(lanes + steps, lanes, steps, alphabet, tables)
    words = rans.encode(symbols, lane_tables, freqs)

    assert torch.equal(rans.decode(words, lane_tables, freqs, steps).long(), symbols)
    state_bits = 32 * lanes  # each lane's final state
    assert 16 * words.numel() <= entropy_bits(symbols, lane_tables) * 1.02 + state_bits + 16 * lanes


def test_frequencies_sum_to_the_precision_and_keep_every_seen_symbol():
    counts = torch.tensor([[10**9, 1, 0, 3], [0, 0, 0, 0]])
    freqs = rans.frequencies(counts)
    assert (freqs.sum(1) == rans.TOTAL).all()
    assert ((freqs[0] > 0) == (counts[0] > 0)).all()
    assert (freqs[1] == rans.TOTAL // 4).all()  # no counts: uniform


def test_a_table_of_one_symbol_costs_nothing_but_the_states():
    symbols = torch.full((1000, 3), 5)
    freqs = rans.frequencies(torch.bincount(symbols.view(-1), minlength=8).unsqueeze(0))
    words = rans.encode(symbols, torch.zeros(3, dtype=torch.int64), freqs)
    assert words.numel() == 2 * 3
    assert torch.equal(rans.decode(words, torch.zeros(3, dtype=torch.int64), freqs, 1000).long(), symbols)


CORRUPTIONS = {
    "a word short": lambda w: w[:-1],
    "a word more": lambda w: torch.cat([w, w[:1]]),
    "fewer words than states": lambda w: w[:3],
    "a flipped state": lambda w: torch.cat([w[:1] ^ 0x40, w[1:]]),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_damaged_words_are_detected(case):
    symbols, lane_tables, freqs = random_lanes(0, 16, 200, 64, 2)
    words = CORRUPTIONS[case](rans.encode(symbols, lane_tables, freqs))
    with pytest.raises(rans.CorruptStream):
        rans.decode(words, lane_tables, freqs, 200)


# --- channels of codes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("channels, tokens", [(3, 1), (5, 511), (4, 1300)])
def test_codes_round_trip_exactly_with_far_offsets_escaped(channels, tokens, monkeypatch):
    monkeypatch.setattr(coded, "BLOCK", 2 * tokens)  # channels in blocks of two: several rANS streams
    generator = torch.Generator().manual_seed(tokens)
    spreads = torch.logspace(0, 3, channels)  # channels from quiet to wider than the symbols reach
    codes = (torch.randn(tokens, channels, generator=generator) * spreads).round().long()
    codes[0, 0] = 10**6  # an attention sink's size
    stored = coded.encode(lambda start, stop: codes[:, start:stop], channels, tokens)

    decoded = coded.decode(stored, channels, tokens, coded.LANE_TOKENS)
    out = torch.empty(channels, tokens, dtype=torch.float64).T  # [tokens, channels], channels not innermost
    half = channels // 2
    decoded.scaled(0, half, 1.0, out[:, :half])
    decoded.scaled(half, channels, 0.5, out[:, half:])
    assert torch.equal(out[:, :half], codes[:, :half].double())
    assert torch.equal(out[:, half:], codes[:, half:] * 0.5)
    assert len(stored.lengths) == -(-channels // 2)
    assert (stored.escapes[:, 1].abs() > coded.SPAN).all()
    sink = [[0, 10**6 - int(codes[:, 0].median())]] if tokens > 1 else []  # one token is its own median
    assert stored.escapes[:1].tolist() == sink


@pytest.mark.parametrize("spread", [2, 60])
def test_a_channel_costs_about_its_entropy_whatever_its_spread(spread):
    """A quiet channel is not charged a wide one's width: Gaussian codes of std s cost log2(s * sqrt(2 pi e)) bits."""
    tokens = 4096
    codes = (torch.randn(tokens, 1, generator=torch.Generator().manual_seed(spread)) * spread).round().long()
    bits = 16 * coded.encode(lambda a, b: codes, 1, tokens).words.numel() / tokens
    assert bits == pytest.approx(math.log2(spread * math.sqrt(2 * math.pi * math.e)), abs=0.15)


@pytest.mark.parametrize("bits", [4, 6])
def test_one_step_a_tensor_rounds_with_the_error_of_the_group_wise_storage(bits):
    """The step is the one whose rounding error, step**2 / 12, is the group-wise storage's mean squared error: the
    same where a channel spans many steps, less in a channel narrower than the step."""
    torch.manual_seed(bits)
    x = torch.randn(2, 1000, 32) * torch.logspace(-1, 1, 32)  # channels of very different ranges
    grouped_error = (dequantize(quantize(x, bits, 64, -2), tuple(x.shape), bits, 64, -2, torch.float32) - x).pow(2)
    step = coded.step_for(x, bits, 64, -2)
    assert step == pytest.approx(math.sqrt(12 * float(grouped_error.mean())))
    coded_error = (coded.rounded(x, step) * step - x).pow(2).mean()
    assert 0.5 * grouped_error.mean() < coded_error < 1.05 * grouped_error.mean()


# --- files ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coded_file(tmp_path_factory, engine, query_aware) -> Path:
    path = tmp_path_factory.mktemp("coded") / "coded.fkv"
    save_cache(path, query_aware.cache, query_aware.manifest, "coded", model=engine.runner)
    return path


def test_a_coded_file_loads_every_value_within_half_its_step(engine, coded_file, query_aware):
    """Values and hidden states within half a step; keys, rounded before RoPE, within half a step in each of a
    rotated pair (a rotation moves the pair's error, not its length); layer 0 rebuilt exactly; queries float16."""
    cache, manifest = load_cache(coded_file, "cpu", torch.float32, engine.runner)
    original = query_aware.cache
    step = {name.removesuffix(".step"): float(t) for name, t in load_file(coded_file).items() if name.endswith(".step")}
    assert manifest.storage.dtype == "coded"
    assert torch.equal(cache.layers[0].keys, original.layers[0].keys)
    for i in range(1, manifest.paused_layer + 1):
        keys, values = f"layers.{i}.keys", f"layers.{i}.values"
        assert (cache.layers[i].values - original.layers[i].values).abs().max() <= step[values] / 2 * 1.0001
        assert (cache.layers[i].keys - original.layers[i].keys).abs().max() <= step[keys] / math.sqrt(2) * 1.0001
    assert (cache.paused.hidden - original.paused.hidden).abs().max() <= step["paused.hidden"] / 2 * 1.0001
    assert torch.equal(cache.paused.queries, original.paused.queries.half().float())
    assert all(layer.length == 0 for layer in cache.layers[manifest.paused_layer + 1 :])


def test_a_coded_file_is_smaller_than_int6_at_about_its_error(engine, query_aware, coded_file, tmp_path):
    int6 = save_cache(tmp_path / "int6.fkv", query_aware.cache, query_aware.manifest, "int6")

    def squared_error(path: Path) -> float:
        loaded = load_cache(path, "cpu", torch.float32, engine.runner)[0]
        pairs = zip(loaded.layers, query_aware.cache.layers, strict=True)
        return sum(float((a.keys - b.keys).pow(2).sum() + (a.values - b.values).pow(2).sum()) for a, b in pairs)

    assert coded_file.stat().st_size < int6
    assert squared_error(coded_file) < 1.2 * squared_error(tmp_path / "int6.fkv")


@pytest.mark.parametrize("lane_tokens", [16, 512])
def test_the_lane_length_changes_the_bytes_never_the_codes(lane_tokens):
    """Shorter lanes store a state each, and decode to exactly the codes in lanes of LANE_TOKENS."""
    tokens, channels = 3000, 3
    generator = torch.Generator().manual_seed(lane_tokens)
    codes = (torch.randn(tokens, channels, generator=generator) * 20).round().long()
    short, long = (
        coded.encode(lambda start, stop: codes[:, start:stop], channels, tokens, n)
        for n in (lane_tokens, coded.LANE_TOKENS)
    )

    assert short.words.numel() > long.words.numel()
    for stored, n in ((short, lane_tokens), (long, coded.LANE_TOKENS)):
        out = torch.empty(tokens, channels, dtype=torch.float64)
        coded.decode(stored, channels, tokens, n).scaled(0, channels, 1.0, out)
        assert torch.equal(out, codes.double())


def test_without_the_model_a_coded_file_keeps_its_keys_as_stored(engine, coded_file):
    """`cache info` loads without a model: the keys stay before RoPE, the rest as with the model."""
    bare, _ = load_cache(coded_file)
    full, _ = load_cache(coded_file, "cpu", torch.float32, engine.runner)
    assert torch.allclose(engine.runner.rotate_keys(bare.layers[1].keys.float()), full.layers[1].keys, atol=1e-5)
    assert torch.equal(bare.layers[1].values.float(), full.layers[1].values)


def test_a_question_blind_cache_cannot_be_coded(engine, saved, tmp_path):
    with pytest.raises(InputError, match="query-aware"):
        save_cache(tmp_path / "blind.fkv", saved.cache, saved.manifest, "coded", model=engine.runner)
    assert not (tmp_path / "blind.fkv").exists()


CODED_CASES = {  # edit of the tensors -> what the refusal names
    "words cut short": (update("coded.words", lambda w: w[:-1]), "coded.lengths count"),
    "fewer words than lanes": (update("coded.words", lambda w: w[:3]), "at least 2 for each of the"),
    "words damaged": (update("coded.words", lambda w: w.flip(0)), "coded.words do not decode"),
    "block lengths of the wrong dtype": (update("coded.lengths", lambda t: t.int()), "coded.lengths should count"),
    "tables not summing to the precision": (update("coded.tables", lambda t: t + 1), "summing to 16384"),
    "negative frequencies": (update("coded.tables", lambda t: -t), "summing to 16384"),
    "tables of another alphabet": (update("coded.tables", lambda t: t[:, :-1].contiguous()), "tables of 512 symbols"),
    "a class past the tables": (update("coded.classes", lambda t: t + 100), "coded.classes should name"),
    "centers of the wrong shape": (update("coded.centers", lambda t: t[:-1]), "coded.centers should hold"),
    "escapes that are not escaped": (
        update("coded.escapes", lambda t: torch.tensor([[0, 999]])),
        "coded.escapes should hold",
    ),
    "a NaN step": (update("paused.hidden.step", lambda t: torch.full_like(t, math.nan)), "paused.hidden.step is nan"),
    "a zero step": (update("layers.1.keys.step", torch.zeros_like), "layers.1.keys.step is 0.0"),
    "an infinite step": (update("layers.1.values.step", lambda t: t / 0), "layers.1.values.step is inf"),
    "a step of two numbers": (update("layers.1.values.step", lambda t: t.repeat(2)), "should be one float32"),
    "float32 queries": (update("paused.queries", lambda t: t.float()), "paused.queries should be float16"),
    "a part missing": (lambda tensors: tensors.pop("coded.escapes"), "the tensors do not match"),
}


@pytest.mark.parametrize("case", CODED_CASES)
def test_a_damaged_coded_file_is_refused_naming_the_part(engine, coded_file, tmp_path, case):
    edit, expected = CODED_CASES[case]
    path = rewrite_tensors(coded_file, tmp_path / "bad.fkv", edit)
    with pytest.raises(CacheFileError, match=str(path)):
        load_cache(path, "cpu", torch.float32, engine.runner)
    assert expected in refusal(load_cache, path, "cpu", torch.float32, engine.runner)


MANIFEST_CASES = {
    "coded without a paused prefill": (
        lambda m: m.update(paused_layer=None),
        "manifest.dtype is coded, which only query-aware files are",
    ),
    "a lane length of the first files": (
        lambda m: m["quantization"].update(lane_tokens=512),
        "lane_tokens is 512, not 2048: coded in a way this version of fastkv does not decode; rebuild it with "
        "`fastkv cache build`",
    ),
    "a lane length not a power of two": (lambda m: m["quantization"].update(lane_tokens=300), "lane_tokens is 300"),
    "a lane length past the largest": (lambda m: m["quantization"].update(lane_tokens=2**20), "is 1048576, not"),
    "a lane length as text": (lambda m: m["quantization"].update(lane_tokens="512"), 'lane_tokens is "512"'),
    "no lane length": (lambda m: m["quantization"].pop("lane_tokens"), "lane_tokens is null"),
    "another coder": (lambda m: m["quantization"].update(coding="huffman"), 'coding is "huffman"'),
    "another span": (lambda m: m["quantization"].update(span=127), "span is 127, not 255"),
    "a context far beyond the stored tokens": (
        lambda m: m.update(context_tokens=m["context_tokens"] * 10**6),
        "paused.ids should hold",  # refused before anything is sized by it
    ),
}


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_a_coded_manifest_this_version_cannot_decode_is_refused(coded_file, tmp_path, case):
    edit, expected = MANIFEST_CASES[case]
    path = rewrite_manifest(coded_file, tmp_path / "bad.fkv", edit)
    assert expected in refusal(load_cache, path)
