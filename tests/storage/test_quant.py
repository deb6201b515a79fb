"""Quantized storage: the arithmetic of core/storage/quant.py, int8/int6/int4 .fkv files and their refusals."""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from core.storage import load_cache, save_cache
from core.storage.quant import (
    CODE_WIDTHS,
    HIDDEN_BITS,
    dequantize,
    grouped,
    pack,
    param_shape,
    paused_layer_bits,
    quantize,
    stored_numel,
    ungrouped,
    unpack,
)
from tests.helpers import QUESTION, build
from tests.storage.rewrite import refusal, rewrite_manifest, rewrite_tensors

# --- the arithmetic -----------------------------------------------------------------------------------


def element_scales(scale: torch.Tensor, shape, group: int, dim: int) -> torch.Tensor:
    """Each element's group scale, in the tensor's shape."""
    dim = dim % len(shape)
    per_group = scale.float().unsqueeze(dim + 1)
    sizes = [-1] * per_group.dim()
    sizes[dim + 1] = group
    return ungrouped(per_group.expand(*sizes), shape[dim], dim)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dim", [-1, -2], ids=["along-channels", "along-tokens"])
@pytest.mark.parametrize("tokens", [37, 64, 1])
def test_round_trip_error_is_at_most_half_a_scale_per_element(bits, dim, tokens):
    torch.manual_seed(tokens)
    x = torch.randn(3, tokens, 64) * torch.logspace(-2, 2, 64)  # channels of very different ranges
    x[0, 0, 5] = 300.0  # an outlier
    q = quantize(x, bits, 16, dim)
    y = dequantize(q, tuple(x.shape), bits, 16, dim, torch.float32)

    assert q.scale.shape == q.zero.shape == param_shape(tuple(x.shape), 16, dim)
    rounding = x.abs() * 2**-22  # float32 arithmetic when a scale is far below its group's values
    assert ((y - x).abs() <= element_scales(q.scale, x.shape, 16, dim) / 2 * (1 + 1e-5) + rounding).all()


def test_a_constant_group_comes_back_exactly():
    x = torch.full((2, 5, 16), 0.1)
    y = dequantize(quantize(x, 4, 16, -1), (2, 5, 16), 4, 16, -1, torch.float32)
    assert (y - x).abs().max() <= 0.1 * 2**-10  # the float16 zero point's rounding alone


@pytest.mark.parametrize("numel", [1, 2, 7, 64])
@pytest.mark.parametrize("bits", [4, 5, 6, 7])
def test_packing_round_trips_codes_exactly_in_whole_bytes(numel, bits):
    codes = torch.randint(0, 1 << bits, (numel,), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.numel() == stored_numel(numel, bits)
    assert numel * bits <= 8 * packed.numel() < numel * bits + math.lcm(bits, 8)  # padded to a whole unit at most
    assert torch.equal(unpack(packed, numel, bits), codes)


def test_int4_codes_pack_two_to_a_byte_the_first_low_and_6_bit_codes_as_one_bit_stream():
    codes = torch.tensor([1, 2, 3, 4, 5], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [0x21, 0x43, 0x05]
    stream = sum(int(code) << (6 * i) for i, code in enumerate(codes.tolist()))  # little-endian, 8 codes: 6 bytes
    assert pack(codes, 6).tolist() == list(stream.to_bytes(6, "little"))


def test_grouping_pads_and_unpads():
    x = torch.arange(30.0).reshape(2, 15)
    assert grouped(x, 4, -1).shape == (2, 4, 4) and grouped(x, 4, 0).shape == (1, 4, 15)
    assert torch.equal(ungrouped(grouped(x, 4, -1), 15, -1), x)
    assert torch.equal(ungrouped(grouped(x, 4, 0), 2, 0), x)


@pytest.mark.parametrize("layers", [1, 2, 4, 12, 15, 30])
@pytest.mark.parametrize("bits", [4, 8])
def test_a_paused_prefills_layers_spend_the_dtypes_bits_on_average_and_more_with_depth(bits, layers):
    widths = paused_layer_bits(bits, layers)
    assert len(widths) == layers and sum(widths) == bits * layers  # the file keeps its size
    assert widths == sorted(widths) and set(widths) <= set(CODE_WIDTHS)
    assert widths == [bits] * layers if bits == 8 or layers < 4 else widths[0] < bits < widths[-1]


def test_a_group_that_does_not_divide_the_channels_is_refused():
    with pytest.raises(ValueError, match="does not divide"):
        quantize(torch.randn(2, 3, 24), 8, 16, -1)


# --- files ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["int8", "int6", "int4"])
def quantized_file(request, tmp_path_factory, query_aware) -> Path:
    """A query-aware cache (every tensor kind: keys, values, paused hidden states and queries), quantized."""
    path = tmp_path_factory.mktemp("quant") / f"{request.param}.fkv"
    save_cache(path, query_aware.cache, query_aware.manifest, request.param)
    return path


def test_a_quantized_file_loads_close_to_the_originals(engine, quantized_file, query_aware):
    """Keys, values and queries at the dtype's bits; the paused hidden states at HIDDEN_BITS in an int4 file;
    layer 0 rebuilt from the token ids, exact."""
    cache, manifest = load_cache(quantized_file, "cpu", torch.float32, engine.runner)
    assert torch.equal(cache.layers[0].keys, query_aware.cache.layers[0].keys)
    quantization = manifest.storage.quantization
    bits, paused = quantization.bits, manifest.paused_layer + 1
    assert quantization.group_size == 16
    assert quantization.hidden_bits == max(bits, HIDDEN_BITS)
    assert list(quantization.layer_bits) == paused_layer_bits(bits, paused)
    widths = [*quantization.layer_bits] + [bits] * (len(cache.layers) - paused)
    layers = list(zip(cache.layers, query_aware.cache.layers, widths, strict=True))
    pairs = [(a.keys, b.keys, width) for a, b, width in layers] + [
        (a.values, b.values, width) for a, b, width in layers
    ]
    pairs += [(cache.paused.hidden, query_aware.cache.paused.hidden, max(bits, HIDDEN_BITS))]
    pairs += [(cache.paused.queries, query_aware.cache.paused.queries, bits)]
    for loaded, original, stored_bits in pairs:
        assert loaded.shape == original.shape and loaded.dtype == torch.float32
        if original.numel():  # half a step of the whole tensor's range bounds every group's error
            span = (original.max() - original.min()).item()
            assert (loaded - original).abs().max().item() <= span / ((1 << stored_bits) - 1) / 2 * 1.01


def test_each_layer_is_stored_at_its_own_width(query_aware, tmp_path, monkeypatch):
    """The tiny model pauses after 2 layers, too few to shift a bit, and layer 0 is rebuilt from the token ids:
    store layer 1 at 3 bits, then at 5."""
    sizes, layers = {}, {}
    for width in (3, 5):
        monkeypatch.setattr("core.storage.scheme.paused_layer_bits", lambda bits, layers, width=width: [bits, width])
        sizes[width] = save_cache(tmp_path / f"{width}.fkv", query_aware.cache, query_aware.manifest, "int4")
        cache, manifest = load_cache(tmp_path / f"{width}.fkv", "cpu", torch.float32)
        assert manifest.storage.quantization.layer_bits == (4, width)
        layers[width] = cache.layers[1]

    original = query_aware.cache.layers[1]
    assert sizes[3] < sizes[5]
    for width, layer in layers.items():
        for loaded, stored in ((layer.keys, original.keys), (layer.values, original.values)):
            span = (stored.max() - stored.min()).item()
            assert (loaded - stored).abs().max().item() <= span / ((1 << width) - 1) / 2 * 1.01
    assert layers[3].keys.sub(original.keys).abs().max() > layers[5].keys.sub(original.keys).abs().max()


def test_an_outlier_channel_of_the_hidden_states_keeps_its_own_scale(query_aware, tmp_path):
    """The residual stream has a few channels far larger than the rest (Qwen2.5's reach ~2000 against a
    median of 0.2). Grouped along tokens, the hidden states' other channels keep their own precision."""
    hidden = query_aware.cache.paused.hidden.clone()
    hidden[:, 3] = 2000.0 * hidden.abs().max()
    cache = replace(query_aware.cache, paused=replace(query_aware.cache.paused, hidden=hidden))
    save_cache(tmp_path / "int4.fkv", cache, query_aware.manifest, "int4")

    loaded = load_cache(tmp_path / "int4.fkv", "cpu", torch.float32)[0].paused.hidden

    others = [c for c in range(hidden.shape[1]) if c != 3]
    span = (hidden[:, others].max() - hidden[:, others].min()).item()
    levels = (1 << max(4, HIDDEN_BITS)) - 1  # an int4 file's hidden states
    assert (loaded[:, others] - hidden[:, others]).abs().max().item() <= span / levels / 2 * 1.01


def test_quantized_files_are_smaller(saved, tmp_path):
    sizes = {}
    for dtype in ("float16", "int8", "int6", "int4"):
        sizes[dtype] = save_cache(tmp_path / f"{dtype}.fkv", saved.cache, saved.manifest, dtype)
    assert sizes["int4"] < sizes["int6"] < sizes["int8"] < sizes["float16"]


def test_answers_from_an_int8_cache_are_close_to_float32s(engine, document, tmp_path):
    """The next-token logits after the question, from an int8 and a float32 file of one query-aware cache.

    int8 moves each stored element by at most 1/510 of its group's range, so the logits should move
    by a small share of their spread: measured 0.36% here; the bound, 2%, leaves five times that for
    other seeds and models, and the top token must not change.
    """
    built = build(engine, document, budget="20%", query_aware=True)
    ids = engine.loaded.tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    logits = {}
    for dtype in ("float32", "int8"):
        save_cache(tmp_path / f"{dtype}.fkv", built.cache, built.manifest, dtype)
        logits[dtype] = engine.append_question(engine.load_saved(tmp_path / f"{dtype}.fkv"), ids)[1].reshape(-1)
    spread = (logits["float32"].max() - logits["float32"].min()).item()
    assert (logits["int8"] - logits["float32"]).abs().max().item() <= 0.02 * spread
    assert logits["int8"].argmax() == logits["float32"].argmax()


# --- refusals ------------------------------------------------------------------------------------------


def change(name: str, edit):
    return lambda tensors: tensors.update({name: edit(tensors[name].clone())})


def put(value):
    def edit(tensor):
        tensor.view(-1)[0] = value
        return tensor

    return edit


BAD_TENSORS = {
    "nan-scale": (change("layers.1.values.scale", put(float("nan"))), "layers.1.values.scale holds NaN"),
    "infinite-scale": (change("layers.1.keys.scale", put(float("inf"))), "layers.1.keys.scale holds NaN or infinite"),
    "infinite-zero": (change("paused.hidden.zero", put(float("-inf"))), "paused.hidden.zero holds NaN or infinite"),
    "zero-scale": (change("paused.queries.scale", put(0.0)), "paused.queries.scale holds scales that are not positive"),
    "scale-of-wrong-shape": (
        change("layers.1.values.scale", lambda t: t[:, :-1].contiguous()),
        "layers.1.values.scale has the wrong shape",
    ),
    "scale-in-float32": (
        change("layers.1.keys.scale", lambda t: t.float()),
        "layers.1.keys.scale has the wrong shape or dtype",
    ),
    "codes-of-wrong-length": (change("layers.1.keys", lambda t: t.reshape(-1)[:-1]), "layers.1.keys should hold"),
    "codes-in-int8": (change("paused.hidden", lambda t: t.view(torch.int8)), "paused.hidden should hold"),
    "missing-zero": (lambda tensors: tensors.pop("layers.2.values.zero"), "the tensors do not match"),
}


@pytest.mark.parametrize("case", BAD_TENSORS, ids=list(BAD_TENSORS))
def test_a_bad_quantized_tensor_is_refused_naming_it(quantized_file, tmp_path, case):
    edit, cause = BAD_TENSORS[case]
    path = rewrite_tensors(quantized_file, tmp_path / "bad.fkv", edit)
    assert cause in refusal(load_cache, path)


def assign_quantization(key, value):
    return lambda manifest: manifest["quantization"].update({key: value})


BAD_SCHEMES = {
    "group-not-dividing": (assign_quantization("group_size", 12), "group_size 12 does not divide model.head_dim 16"),
    "group-zero": (assign_quantization("group_size", 0), "group_size 0 does not divide"),
    "bits-of-another-dtype": (assign_quantization("bits", 2), "manifest.quantization.bits is 2"),
    "unknown-grouping": (assign_quantization("key_groups", "heads"), "unknown grouping"),
    "unknown-hidden-grouping": (assign_quantization("hidden_groups", "layers"), "unknown grouping"),
    "no-hidden-grouping": (lambda m: m["quantization"].pop("hidden_groups"), "quantization.hidden_groups is missing"),
    "hidden-bits-unknown": (assign_quantization("hidden_bits", 9), "manifest.quantization.hidden_bits is 9"),
    "no-hidden-bits": (lambda m: m["quantization"].pop("hidden_bits"), "quantization.hidden_bits is missing"),
    "layer-bits-unknown": (assign_quantization("layer_bits", [9, 4]), "manifest.quantization.layer_bits should list"),
    "layer-bits-too-many": (
        assign_quantization("layer_bits", [4] * 99),
        "manifest.quantization.layer_bits should list",
    ),
    "layer-bits-not-a-list": (assign_quantization("layer_bits", 4), "manifest.quantization.layer_bits should be list"),
    "layer-bits-wrong-width": (assign_quantization("layer_bits", [4, 3]), "layers.1.keys should hold"),
    "no-scheme": (lambda manifest: manifest.update(quantization=None), "manifest.quantization is missing"),
    "float-with-scheme": (lambda manifest: manifest.update(dtype="float16"), "should be null for float16"),
}


@pytest.mark.parametrize("case", BAD_SCHEMES, ids=list(BAD_SCHEMES))
def test_a_bad_quantization_scheme_is_refused(quantized_file, tmp_path, case):
    edit, cause = BAD_SCHEMES[case]
    path = rewrite_manifest(quantized_file, tmp_path / "bad.fkv", edit)
    assert cause in refusal(load_cache, path)


def test_the_checksum_covers_the_codes_as_stored(quantized_file, tmp_path):
    path = rewrite_tensors(quantized_file, tmp_path / "bad.fkv", change("layers.1.keys", lambda t: t ^ 1), rehash=False)
    assert "checksum" in refusal(load_cache, path)


def test_the_build_summary_keeps_its_keys_and_adds_the_storage(saved):
    from core.saved import BuiltCache

    summary = BuiltCache(saved, Path("c.fkv"), 1000, 0.5, "int4").to_dict()
    assert {"output", "file_bytes", "save_s", "prefill_s", "kept_tokens_per_layer"} <= set(summary)
    assert summary["kind"] == "question-blind" and summary["cache_dtype"] == "int4"
    assert summary["quantization"]["bits"] == 4
    assert summary["file_share_of_fullkv_float16"] == 1000 / summary["fullkv_float16_bytes"]


def test_the_storage_line_names_the_widths_that_differ_from_the_dtypes():
    from fastkv_cli.render import storage

    scheme = {"bits": 4, "hidden_bits": 6, "layer_bits": [3, 4, 4, 5], "group_size": 64}
    assert (
        storage("int4", scheme, True)
        == "int4 in groups of 64, hidden states at 6 bits, keys and values at 3 to 5 bits by layer"
    )
    assert (
        storage("int8", {**scheme, "bits": 8, "hidden_bits": 8, "layer_bits": [8] * 4}, True) == "int8 in groups of 64"
    )
