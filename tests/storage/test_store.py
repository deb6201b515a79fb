"""The .fkv cache file and saved contexts at engine level: round trips, answers, refusals, atomic writes."""

import copy
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

import core.atomic
import core.engine
from core.engine import Engine
from core.errors import FastKVError, InputError
from core.generation import Decoding
from core.kvcache import EMPTY, KVCache
from core.methods import Budget, make_method
from core.models import LoadedModel
from core.options import BuildPlan
from core.prompt import encode_question
from core.storage import FORMAT_VERSION, Storage, describe_cache, load_cache, read_manifest, save_cache
from tests.helpers import QUESTION, assert_bit_equal, assert_same_cache, build
from tests.storage.rewrite import assign, delete, refusal, rewrite_manifest, rewrite_tensors, update

OTHER_QUESTION = "Who designed the tower?"
NUM_LAYERS, KV_HEADS, HEAD_DIM = 4, 2, 16


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory, saved) -> Path:
    path = tmp_path_factory.mktemp("fkv") / "harrow.fkv"
    save_cache(path, saved.cache, saved.manifest, "float16")
    return path


def snapshot(cache: KVCache) -> KVCache:
    return cache.clone()


@pytest.fixture
def token_log(monkeypatch) -> list[list[int]]:
    """The token ids each answer decoded (Answer.tokens is left empty by the engine)."""
    log: list[list[int]] = []
    real_generate = core.engine.generate

    def recording_generate(*args, **kwargs):
        tokens = real_generate(*args, **kwargs)
        log.append(list(tokens))
        return tokens

    monkeypatch.setattr(core.engine, "generate", recording_generate)
    return log


# --- 1. round trip ------------------------------------------------------------------------------------


def test_float32_round_trip_is_bit_exact_with_the_same_manifest(engine, saved, tmp_path):
    path = tmp_path / "c.fkv"

    written = save_cache(path, saved.cache, saved.manifest, "float32")
    cache, manifest = load_cache(path, "cpu", None)

    assert written == path.stat().st_size
    assert_same_cache(cache, saved.cache)
    assert manifest == replace(saved.manifest, storage=Storage("float32", None, manifest.storage.tensors_sha256))
    assert len(manifest.storage.tensors_sha256) == 64
    assert read_manifest(path) == manifest


def test_query_aware_round_trip_keeps_the_paused_prefill_bit_exact(engine, query_aware, tmp_path):
    """Layer 0 is stored as the token ids and rebuilt from them by the model, to the bit."""
    path = tmp_path / "c.fkv"

    save_cache(path, query_aware.cache, query_aware.manifest, "float32")
    cache, manifest = load_cache(path, "cpu", None, engine.runner)

    assert manifest.paused_layer == query_aware.cache.paused.layer == NUM_LAYERS // 2 - 1
    assert_same_cache(cache, query_aware.cache)
    assert torch.equal(cache.paused.hidden, query_aware.cache.paused.hidden)
    with safe_open(str(path), framework="pt") as f:
        assert "layers.0.keys" not in f.keys() and f.get_tensor("paused.ids").shape == (cache.seq_len,)


@pytest.mark.parametrize(("name", "dtype"), [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_smaller_cache_dtype_loads_the_cast_originals_bit_for_bit(saved, tmp_path, name, dtype):
    path = tmp_path / "c.fkv"

    save_cache(path, saved.cache, saved.manifest, name)
    cache, manifest = load_cache(path, "cpu", None)

    assert manifest.storage.dtype == name
    assert cache.seq_len == saved.cache.seq_len
    for loaded, original in zip(cache.layers, saved.cache.layers, strict=True):
        assert_bit_equal(loaded.keys, original.keys.to(dtype))
        assert_bit_equal(loaded.values, original.values.to(dtype))
        assert_bit_equal(loaded.positions, original.positions)


def test_round_trip_for_every_model_family(tiny_model, tiny_tokenizer, document, tmp_path):
    model = copy.deepcopy(tiny_model)  # the session model is shared: resize a copy to the tokenizer
    model.resize_token_embeddings(len(tiny_tokenizer), mean_resizing=False)
    engine = Engine(LoadedModel(model, tiny_tokenizer, model.config.model_type, tmp_path))
    saved = engine.build([document], BuildPlan(make_method("fastkv", budget="30%")))
    path = tmp_path / "c.fkv"

    save_cache(path, saved.cache, saved.manifest, "float32")
    cache, manifest = load_cache(path, "cpu", torch.float32)

    assert_same_cache(cache, saved.cache)
    assert manifest.model.model_type == model.config.model_type
    engine.check_compatible(manifest, str(path))  # its own model: accepted


# --- 2. answers from a saved cache --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", [{}, {"query_budget": "20%"}, {"query_aware": True}], ids=["question-blind", "two-stage", "query-aware"]
)
def test_answer_from_a_loaded_cache_equals_the_in_memory_answer(engine, document, tmp_path, token_log, kind):
    saved = build(engine, document, **kind)
    path = tmp_path / "c.fkv"
    save_cache(path, saved.cache, saved.manifest, "float32")
    loaded = engine.load_saved(path)
    decoding = Decoding(max_new_tokens=6)

    in_memory = engine.query(saved, QUESTION, decoding=decoding)
    from_file = engine.query(loaded, QUESTION, decoding=decoding)

    assert from_file.text == in_memory.text
    assert token_log[0] and token_log[1] == token_log[0]
    assert from_file.stats.kept_tokens_per_layer == in_memory.stats.kept_tokens_per_layer


def test_querying_twice_leaves_the_saved_cache_unchanged(engine, document, token_log):
    saved = build(engine, document, query_budget="20%")
    before = snapshot(saved.cache)
    decoding = Decoding(max_new_tokens=5)

    first = engine.query(saved, QUESTION, decoding=decoding)
    assert_same_cache(saved.cache, before)
    other = engine.query(saved, OTHER_QUESTION, decoding=decoding)
    again = engine.query(saved, QUESTION, decoding=decoding)
    fresh_other = engine.query(build(engine, document, query_budget="20%"), OTHER_QUESTION, decoding=decoding)

    assert_same_cache(saved.cache, before)
    assert again.text == first.text and token_log[2] == token_log[0]
    assert other.text == fresh_other.text and token_log[1] == token_log[3]
    assert first.stats.new_tokens == len(token_log[0])


# --- 3. refusals ----------------------------------------------------------------------------------------


def other_engine(engine: Engine, name: str, tokenizer=None, reweight: bool = False) -> Engine:
    model = copy.deepcopy(engine.loaded.model)
    if reweight:
        generator = torch.Generator().manual_seed(99)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    tokenizer = tokenizer or engine.loaded.tokenizer
    return Engine(LoadedModel(model, tokenizer, name, engine.loaded.folder, name))


def test_the_building_model_is_accepted(engine, cache_file):
    engine.check_compatible(read_manifest(cache_file), str(cache_file))


def test_another_model_is_refused_naming_both_models(engine, cache_file):
    other = other_engine(engine, "other-tiny", reweight=True)

    message = refusal(lambda path: other.check_compatible(read_manifest(path), str(path)), cache_file)

    assert "weights_sha256" in message
    assert "other-tiny" in message and engine.loaded.name in message
    assert "model_type" not in message  # only what differs is named


def test_another_model_family_is_refused_naming_the_differences(tiny_models, tiny_tokenizer, cache_file, tmp_path):
    qwen3 = Engine(LoadedModel(tiny_models["qwen3"], tiny_tokenizer, "tiny-qwen3", tmp_path))

    message = refusal(lambda path: qwen3.check_compatible(read_manifest(path), str(path)), cache_file)

    assert "(model_type, vocab_size, weights_sha256)" in message
    assert "tiny-qwen3" in message


def test_another_tokenizer_is_refused(engine, cache_file):
    tokenizer = copy.deepcopy(engine.loaded.tokenizer)
    tokenizer.add_tokens(["<|lighthouse|>"])
    other = other_engine(engine, "same-weights", tokenizer=tokenizer)

    message = refusal(lambda path: other.check_compatible(read_manifest(path), str(path)), cache_file)

    assert "different tokenizer" in message


def test_rewriting_the_header_alone_keeps_a_loadable_file(cache_file, tmp_path):
    """Control for the manifest cases below: the rewrite itself breaks nothing."""
    path = rewrite_manifest(cache_file, tmp_path / "same.fkv", lambda manifest: None)

    assert load_cache(path)[1] == load_cache(cache_file)[1]


MANIFEST_CASES = {
    "future-version": (assign(FORMAT_VERSION + 1, "format_version"), f"format version {FORMAT_VERSION + 1}"),
    "version-as-bool": (assign(True, "format_version"), "format version True"),
    "version-as-string": (assign("1", "format_version"), "format version '1'"),
    "no-version": (delete("format_version"), "format version None"),
    "missing-field": (delete("context_tokens"), "manifest.context_tokens is missing"),
    "missing-nested-field": (delete("model", "num_kv_heads"), "manifest.model.num_kv_heads is missing"),
    "missing-document-field": (delete("documents", 0, "sha256"), "manifest.documents[0].sha256 is missing"),
    "string-for-int": (lambda m: m.update(context_tokens=str(m["context_tokens"])), "should be int, not str"),
    "bool-for-int": (assign(True, "steering_questions"), "steering_questions should be int, not bool"),
    "string-for-paused-layer": (assign("1", "paused_layer"), "paused_layer should be int or NoneType, not str"),
    "float-for-int": (assign(4.0, "model", "num_layers"), "num_layers should be int, not float"),
    "int-for-str": (assign(7, "tokenizer_sha256"), "tokenizer_sha256 should be str, not int"),
    "list-for-object": (assign([], "template"), "manifest.template should be an object"),
    "object-for-list": (assign({}, "documents"), "manifest.documents should be a list"),
    "context-beyond-int32-positions": (assign(2**63, "context_tokens"), "context_tokens should be 1 to 2**31 - 1"),
    "unknown-dtype": (assign("int2", "dtype"), "unknown tensor dtype 'int2'"),
    "quantized-dtype-without-scheme": (assign("int8", "dtype"), "manifest.quantization is missing for int8"),
    "not-json": ("{not json", "not valid JSON"),
    "no-manifest": (None, "no manifest"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_bad_manifest_is_refused_naming_the_cause(cache_file, tmp_path, case):
    edit, needle = MANIFEST_CASES[case]
    path = rewrite_manifest(cache_file, tmp_path / f"{case}.fkv", edit)

    for read in (load_cache, read_manifest, describe_cache):
        assert needle in refusal(read, path)


def truncation_offsets(data: bytes) -> dict[str, int]:
    (length,) = struct.unpack("<Q", data[:8])
    body = len(data) - 8 - length
    return {
        "empty": 0,
        "inside-length": 5,
        "inside-header": 8 + length // 2,
        "end-of-header": 8 + length,
        "inside-data": 8 + length + body // 2,
        "last-byte": len(data) - 1,
    }


@pytest.mark.parametrize(
    "where", ["empty", "inside-length", "inside-header", "end-of-header", "inside-data", "last-byte"]
)
def test_truncated_file_is_refused(cache_file, tmp_path, where):
    data = cache_file.read_bytes()
    path = tmp_path / "cut.fkv"
    path.write_bytes(data[: truncation_offsets(data)[where]])

    for read in (load_cache, read_manifest):
        refusal(read, path)


@pytest.mark.parametrize("where", ["inside-header", "inside-data", "last-byte"])
def test_truncated_file_message_says_truncated(cache_file, tmp_path, where):
    data = cache_file.read_bytes()
    path = tmp_path / "cut.fkv"
    path.write_bytes(data[: truncation_offsets(data)[where]])

    assert "truncated" in refusal(load_cache, path)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_byte_in_tensor_data_fails_the_checksum(cache_file, tmp_path, where):
    data = bytearray(cache_file.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    start = 8 + length
    offset = {"first": start, "middle": (start + len(data)) // 2, "last": len(data) - 1}[where]
    data[offset] ^= 0x10
    path = tmp_path / "flipped.fkv"
    path.write_bytes(bytes(data))

    read_manifest(path)  # the header is intact ...
    assert "does not match its checksum" in refusal(load_cache, path)  # ... the data is not


@pytest.mark.parametrize(
    "content",
    [b"", b"The Harrow Point lighthouse was automated in 1987.\n", bytes(range(256)) * 8],
    ids=["empty", "text", "random-bytes"],
)
def test_a_file_that_is_not_safetensors_is_refused(tmp_path, content):
    path = tmp_path / "not.fkv"
    path.write_bytes(content)

    for read in (load_cache, read_manifest, describe_cache):
        assert refusal(read, path).startswith("not a fastkv cache file (not readable as safetensors")


def test_safetensors_without_a_manifest_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    path.write_bytes(save({"x": torch.zeros(2)}, metadata={"format": "pt"}))

    assert "not a fastkv cache (no manifest)" in refusal(load_cache, path)


@pytest.mark.parametrize("path", ["missing.fkv", "."])
def test_a_missing_file_or_directory_is_refused(tmp_path, path):
    assert refusal(load_cache, tmp_path / path) == "no such cache file"


def drop_layer(tensors):
    for part in ("keys", "values", "positions"):
        del tensors[f"layers.{NUM_LAYERS - 1}.{part}"]


def out_of_range(positions):
    positions = positions.clone()
    positions[0, -1] = 10**6
    return positions


def negative(positions):
    positions = positions.clone()
    positions[1, 0] = -2  # -1 starting a row is an empty slot (head-adaptive budgets)
    return positions


def empty_after_a_token(positions):
    positions = positions.clone()
    positions[1, 1] = EMPTY
    return positions


def empty_slots(positions):
    positions = positions.clone()
    positions[0, :2] = EMPTY
    return positions


def stored_without(edit):
    """Layer 0's positions edited by `edit`, and its keys and values only at the slots that are then not empty, as
    a file stores a layer with empty slots."""

    def edited(tensors):
        positions = tensors["layers.0.positions"] = edit(tensors["layers.0.positions"])
        for part in ("keys", "values"):
            tensors[f"layers.0.{part}"] = tensors[f"layers.0.{part}"][positions != EMPTY].contiguous()

    return edited


TENSOR_CASES = {
    "dropped-layer": (drop_layer, "do not match the model's 4 layers"),
    "extra-tensor": (
        lambda t: t.update({"layers.4.keys": t["layers.0.keys"].clone()}),
        "do not match the model's 4 layers",
    ),
    "renamed-tensor": (lambda t: t.update({"layers.0.key": t.pop("layers.0.keys")}), "do not match"),
    "one-kv-head-less": (
        update("layers.1.keys", lambda k: k[:1].contiguous()),
        "layer 1 has tensors of the wrong shape",
    ),
    "short-head-dim": (
        update("layers.0.values", lambda v: v[..., :8].contiguous()),
        "layer 0 has tensors of the wrong shape",
    ),
    "values-longer-than-keys": (
        update("layers.2.values", lambda v: torch.cat([v, v[:, :1]], dim=1)),
        "layer 2 has tensors of the wrong shape",
    ),
    "positions-shorter": (
        update("layers.3.positions", lambda p: p[:, 1:].contiguous()),
        "layer 3 has tensors of the wrong shape",
    ),
    "flat-keys": (
        update("layers.0.keys", lambda k: k.reshape(-1).contiguous()),
        "layer 0 has tensors of the wrong shape",
    ),
    "keys-in-float32": (update("layers.0.keys", lambda k: k.float()), "layer 0 has tensors of the wrong dtype"),
    "positions-in-int64": (update("layers.2.positions", lambda p: p.long()), "layer 2 has tensors of the wrong dtype"),
    "position-past-the-context": (
        update("layers.1.positions", out_of_range),
        "layer 1 has positions outside the context",
    ),
    "negative-position": (update("layers.0.positions", negative), "layer 0 has positions outside the context"),
    "empty-slot-after-a-token": (
        stored_without(empty_after_a_token),
        "layer 0 has empty slots after its tokens",
    ),
}


def drop_paused(tensors):
    del tensors["paused.hidden"]


def drop_queries(tensors):
    del tensors["paused.queries"]


def drop_last_token(layer: int):
    def edit(tensors):
        for part in ("keys", "values", "positions"):
            if f"layers.{layer}.{part}" in tensors:
                tensors[f"layers.{layer}.{part}"] = tensors[f"layers.{layer}.{part}"][:, :-1].contiguous()

    return edit


def fill_deeper_layer(tensors):
    for part in ("keys", "values"):
        tensors[f"layers.{NUM_LAYERS - 1}.{part}"] = tensors[f"layers.1.{part}"][:, :3].contiguous()
    kv_heads = tensors["layers.1.keys"].shape[0]
    tensors[f"layers.{NUM_LAYERS - 1}.positions"] = torch.arange(3, dtype=torch.int32).repeat(kv_heads, 1)


PAUSED_CASES = {
    "hidden-states-missing": (drop_paused, "and a paused prefill"),
    "hidden-states-too-narrow": (update("paused.hidden", lambda h: h[:, 1:].contiguous()), "wrong shape"),
    "hidden-state-missing": (update("paused.hidden", lambda h: h[1:].contiguous()), "wrong shape"),
    "hidden-states-in-float32": (update("paused.hidden", lambda h: h.float()), "hidden states have the wrong dtype"),
    "queries-missing": (drop_queries, "and a paused prefill"),
    "queries-of-a-layer-too-few": (
        update("paused.queries", lambda q: q[1:].contiguous()),
        "queries have the wrong shape",
    ),
    "queries-of-a-token-too-few": (
        update("paused.queries", lambda q: q[:, :, 1:].contiguous()),
        "queries have the wrong shape",
    ),
    "queries-in-float32": (update("paused.queries", lambda q: q.float()), "queries have the wrong dtype"),
    "paused-layer-misses-a-token": (drop_last_token(1), "layer 1 has tensors of the wrong shape"),
    "deeper-layer-caches-tokens": (fill_deeper_layer, f"layer {NUM_LAYERS - 1} is past the paused layer 1"),
    "token-ids-missing": (lambda t: t.pop("paused.ids"), "and a paused prefill"),
    "a-token-id-too-few": (update("paused.ids", lambda ids: ids[1:].contiguous()), "paused.ids should hold"),
    "token-ids-in-int64": (update("paused.ids", lambda ids: ids.long()), "paused.ids should hold"),
    "token-id-past-the-vocabulary": (
        update("paused.ids", lambda ids: ids.index_fill(0, torch.tensor([3]), 1 << 30)),
        "paused.ids holds token ids outside the model's vocabulary",
    ),
    "negative-token-id": (
        update("paused.ids", lambda ids: ids.index_fill(0, torch.tensor([0]), -1)),
        "paused.ids holds token ids outside",
    ),
}


@pytest.fixture(scope="module")
def query_aware_file(tmp_path_factory, query_aware) -> Path:
    path = tmp_path_factory.mktemp("fkv") / "query-aware.fkv"
    save_cache(path, query_aware.cache, query_aware.manifest, "float16")
    return path


@pytest.mark.parametrize("case", list(PAUSED_CASES))
def test_a_bad_paused_prefill_is_refused_naming_the_cause(query_aware_file, tmp_path, case):
    edit, needle = PAUSED_CASES[case]
    path = rewrite_tensors(query_aware_file, tmp_path / f"{case}.fkv", edit)

    assert needle in refusal(load_cache, path)


@pytest.mark.parametrize(
    "edit",
    [assign(2, "paused_layer"), assign("snapkv", "method", "name"), assign("x", "method", "parameters", "tsp_kernel")],
    ids=["other-layer", "method-without-tsp", "bad-parameter"],
)
def test_a_paused_layer_its_method_does_not_resume_at_is_refused(query_aware_file, tmp_path, edit):
    path = rewrite_manifest(query_aware_file, tmp_path / "moved.fkv", edit)

    assert "is not where --method" in refusal(load_cache, path)


def test_a_context_count_beyond_the_stored_tokens_is_refused_before_positions_are_built(
    query_aware, query_aware_file, tmp_path, monkeypatch
):
    """A paused prefill's positions are not stored (every context token, in order); the loader builds them,
    so the manifest's count must be checked against the stored keys first: 2**31 - 1 would be gigabytes."""
    path = rewrite_manifest(query_aware_file, tmp_path / "long.fkv", assign(2**31 - 1, "context_tokens"))
    built = []
    arange = torch.arange
    monkeypatch.setattr(torch, "arange", lambda n, *a, **k: built.append(n) or arange(n, *a, **k))

    assert "layer 1 has tensors of the wrong shape" in refusal(load_cache, path)
    assert all(n <= query_aware.cache.seq_len for n in built)


def test_paused_hidden_states_without_a_paused_layer_are_refused(query_aware_file, tmp_path):
    path = rewrite_manifest(query_aware_file, tmp_path / "no-layer.fkv", assign(None, "paused_layer"))

    assert "tensors do not match the model's 4 layers" in refusal(load_cache, path)


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_bad_tensors_are_refused_naming_the_cause(cache_file, tmp_path, case):
    edit, needle = TENSOR_CASES[case]
    path = rewrite_tensors(cache_file, tmp_path / f"{case}.fkv", edit)

    assert needle in refusal(load_cache, path)


def test_re_saved_tensors_without_a_new_checksum_fail_the_checksum(cache_file, tmp_path):
    path = rewrite_tensors(
        cache_file, tmp_path / "tampered.fkv", update("layers.0.values", lambda v: v * 2), rehash=False
    )

    assert "does not match its checksum" in refusal(load_cache, path)


def test_re_saving_unchanged_tensors_keeps_a_loadable_file(cache_file, tmp_path):
    """Control for the tensor cases above: the re-save itself breaks nothing."""
    path = rewrite_tensors(cache_file, tmp_path / "same.fkv", lambda tensors: None)

    assert_same_cache(load_cache(path)[0], load_cache(cache_file)[0])


def test_values_in_another_dtype_are_refused(cache_file, tmp_path):
    path = rewrite_tensors(cache_file, tmp_path / "values.fkv", update("layers.0.values", lambda v: v.float()))

    assert "wrong dtype" in refusal(load_cache, path)


# --- 4. writes ------------------------------------------------------------------------------------------


def failing_write(error: BaseException):
    def write_all(f, data, chunk=1 << 24):
        f.write(data[: len(data) // 2])
        f.flush()
        raise error

    return write_all


def raising(error: BaseException):
    def fail(*args, **kwargs):
        raise error

    return fail


FAILURE_POINTS = {
    "write": lambda mp, error: mp.setattr(core.atomic, "write_all", failing_write(error)),
    "fsync": lambda mp, error: mp.setattr(core.atomic.os, "fsync", raising(error)),
    "rename": lambda mp, error: [mp.setattr(core.atomic.os, name, raising(error)) for name in ("replace", "link")],
}


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
@pytest.mark.parametrize(
    "error", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["oserror", "ctrl-c"]
)
@pytest.mark.parametrize("point", list(FAILURE_POINTS))
def test_interrupted_save_leaves_no_partial_file(saved, tmp_path, monkeypatch, point, error, overwrite):
    path = tmp_path / "c.fkv"
    old = b"the previous cache"
    if overwrite:
        path.write_bytes(old)
    FAILURE_POINTS[point](monkeypatch, error)

    with pytest.raises(FastKVError if isinstance(error, OSError) else type(error)):  # OSError: one line, exit 1
        save_cache(path, saved.cache, saved.manifest, force=overwrite)
    monkeypatch.undo()

    assert list(tmp_path.glob(".*.tmp")) == []
    assert [p.name for p in tmp_path.iterdir()] == (["c.fkv"] if overwrite else [])
    if overwrite:
        assert path.read_bytes() == old


def test_a_save_writes_through_the_temp_file(saved, tmp_path, monkeypatch):
    """Control for the failure cases: the patched write_all is the one save_cache uses."""
    seen = []
    real = core.atomic.write_all

    def listing_write(f, data):
        seen.append([p.name for p in tmp_path.iterdir()])
        real(f, data)

    monkeypatch.setattr(core.atomic, "write_all", listing_write)

    save_cache(tmp_path / "c.fkv", saved.cache, saved.manifest)

    [[temp]] = seen  # while writing, only the temp file exists
    assert temp.startswith(".c.fkv.") and temp.endswith(".tmp")
    assert [p.name for p in tmp_path.iterdir()] == ["c.fkv"]


def test_existing_output_needs_force(saved, tmp_path):
    path = tmp_path / "c.fkv"
    path.write_bytes(b"old")

    with pytest.raises(InputError, match="--force"):
        save_cache(path, saved.cache, saved.manifest)
    assert path.read_bytes() == b"old"

    save_cache(path, saved.cache, saved.manifest, "float32", force=True)
    assert_same_cache(load_cache(path, "cpu", None)[0], saved.cache)


@pytest.mark.parametrize("force", [False, True])
def test_a_directory_output_is_refused(saved, tmp_path, force):
    with pytest.raises(InputError, match="is a directory"):
        save_cache(tmp_path, saved.cache, saved.manifest, force=force)


def test_a_missing_parent_directory_is_refused(saved, tmp_path):
    with pytest.raises(InputError, match="no such directory"):
        save_cache(tmp_path / "nowhere" / "c.fkv", saved.cache, saved.manifest)
    assert not (tmp_path / "nowhere").exists()


def test_an_unknown_cache_dtype_is_refused(saved, tmp_path):
    with pytest.raises(InputError, match="--cache-dtype"):
        save_cache(tmp_path / "c.fkv", saved.cache, saved.manifest, "int2")
    assert list(tmp_path.iterdir()) == []


# --- 5. two-stage re-selection -------------------------------------------------------------------------


@pytest.fixture
def extended_caches(engine, monkeypatch) -> list[KVCache]:
    """The cache of each query, as it is right after the question's prefill (before any decode step)."""
    caches: list[KVCache] = []
    real_extend = engine.runner.extend

    def spy(cache, ids, method=None):
        logits = real_extend(cache, ids, method)
        if not caches:
            caches.append(cache)
        return logits

    monkeypatch.setattr(engine.runner, "extend", spy)
    return caches


def question_length(engine: Engine, question: str) -> int:
    return len(encode_question(engine.loaded.tokenizer, engine.template, question))


def test_query_budget_reselects_to_the_budget_with_the_question_last(engine, document, extended_caches):
    saved = build(engine, document, budget="50%")
    stored = saved.cache.kept_tokens_per_layer
    context, q = saved.manifest.context_tokens, question_length(engine, QUESTION)
    expected = max(int(0.1 * (context + q)), q)  # the question is the window, counted in the budget
    assert expected > q and all(expected < n + q for n in stored)  # re-selection really drops tokens

    answer = engine.query(saved, QUESTION, Budget.parse("10%"), Decoding(max_new_tokens=1))

    [cache] = extended_caches
    assert answer.stats.kept_tokens_per_layer == [expected] * NUM_LAYERS
    assert answer.budget == "10%"
    question_positions = torch.arange(context, context + q)
    for layer, kept in zip(cache.layers, saved.cache.layers, strict=True):
        assert layer.keys.shape == (KV_HEADS, expected, HEAD_DIM)
        assert layer.positions.shape == (KV_HEADS, expected)
        for head in range(KV_HEADS):
            positions = layer.positions[head]
            assert torch.equal(positions[-q:], question_positions)
            assert bool((positions[1:] > positions[:-1]).all())
            assert set(positions[:-q].tolist()) <= set(kept.positions[head].tolist())  # re-selects stored tokens


def test_query_budget_stored_in_the_file_is_the_default(engine, document, extended_caches):
    saved = build(engine, document, budget="50%", query_budget="10%")
    context, q = saved.manifest.context_tokens, question_length(engine, QUESTION)

    answer = engine.query(saved, QUESTION, decoding=Decoding(max_new_tokens=1))

    assert answer.stats.kept_tokens_per_layer == [max(int(0.1 * (context + q)), q)] * NUM_LAYERS
    assert answer.budget == "10%"


def test_without_a_query_budget_every_stored_token_is_kept(engine, document, extended_caches):
    saved = build(engine, document, budget="50%")
    stored = saved.cache.kept_tokens_per_layer
    context, q = saved.manifest.context_tokens, question_length(engine, QUESTION)

    engine.query(saved, QUESTION, decoding=Decoding(max_new_tokens=1))

    [cache] = extended_caches
    assert cache.kept_tokens_per_layer == [n + q for n in stored]
    assert cache.seq_len == context + q
    for layer, kept in zip(cache.layers, saved.cache.layers, strict=True):
        assert torch.equal(layer.positions[:, :-q], kept.positions)
        assert torch.equal(layer.keys[:, :-q], kept.keys)
        assert torch.equal(layer.positions[:, -q:], torch.arange(context, context + q).expand(KV_HEADS, -1))


# --- 6. steering questions --------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [None, "35%"], ids=["built-budget", "query-budget"])
def test_a_query_aware_cache_answers_exactly_as_ask(engine, document, tmp_path, token_log, budget):
    path = tmp_path / "q.fkv"
    saved = build(engine, document, budget="20%", query_aware=True)
    save_cache(path, saved.cache, saved.manifest, "float32")
    decoding = Decoding(max_new_tokens=8)

    answer = engine.query(engine.load_saved(path), QUESTION, Budget.parse(budget or "20%"), decoding)
    asked = engine.ask([document], QUESTION, make_method("fastkv", budget=budget or "20%", window=8), decoding)

    assert token_log[0] == token_log[1] and answer.text == asked.text
    assert answer.stats.kept_tokens_per_layer == asked.stats.kept_tokens_per_layer
    assert answer.budget == asked.budget == (budget or "20%")


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ({"method": "snapkv"}, "--method snapkv has none"),
        ({"query_budget": "10%"}, "--query-budget does not apply to --query-aware"),
        ({"questions": [OTHER_QUESTION]}, "--questions does not apply to --query-aware"),
    ],
)
def test_query_aware_builds_that_cannot_be_are_refused(engine, document, kind, needle):
    method = make_method(kind.get("method", "fastkv"), budget="20%")
    query = Budget.parse(kind["query_budget"]) if "query_budget" in kind else None

    with pytest.raises(InputError, match=needle):
        BuildPlan(method, query, tuple(kind.get("questions", [])), query_aware=True)


def test_steering_questions_are_dropped_and_the_budget_is_kept(engine, document):
    questions = [QUESTION, OTHER_QUESTION]

    steered = build(engine, document, budget="10%", questions=questions)
    plain = build(engine, document, budget="10%")

    context = steered.manifest.context_tokens
    budget = max(int(0.1 * context), 8)
    assert context == plain.manifest.context_tokens
    assert steered.cache.seq_len == context
    assert steered.manifest.steering_questions == 2
    assert steered.cache.kept_tokens_per_layer == [budget] * NUM_LAYERS == plain.cache.kept_tokens_per_layer
    for layer in steered.cache.layers:
        assert layer.positions.shape == (KV_HEADS, budget)
        assert int(layer.positions.max()) < context and int(layer.positions.min()) >= 0
    assert any(
        not torch.equal(a.positions, b.positions) for a, b in zip(steered.cache.layers, plain.cache.layers, strict=True)
    )  # the questions, not the end of the document, chose the tokens


# --- 7. methods a saved cache cannot use ---------------------------------------------------------------------


def test_gemfilter_is_refused_by_build(engine, document):
    with pytest.raises(InputError, match="gemfilter"):
        BuildPlan(make_method("gemfilter"))


def without_the_empty_slots(tensors):
    """Layer 0 as a head-adaptive cache stores it: its first head's first two slots empty, its keys and values
    only the other slots'."""
    stored_without(empty_slots)(tensors)


def test_empty_slots_starting_a_row_load_as_a_padded_layer(cache_file, tmp_path):
    """Head-adaptive caches' rows may start with empty slots (position -1), which the file does not store."""
    original = load_cache(cache_file)[0].layers[0]
    padded = rewrite_tensors(cache_file, tmp_path / "padded.fkv", without_the_empty_slots)

    layer = load_cache(padded)[0].layers[0]
    assert layer.padded and layer.kept < layer.length
    assert not layer.keys[0, :2].any() and not layer.values[0, :2].any()  # zeros where nothing is stored
    assert torch.equal(layer.keys[0, 2:], original.keys[0, 2:]) and torch.equal(layer.values[1], original.values[1])


def one_slot_more(tensors):
    without_the_empty_slots(tensors)
    keys = tensors["layers.0.keys"]
    tensors["layers.0.keys"] = torch.cat([keys, keys[:1]])


@pytest.mark.parametrize(
    "edit", [update("layers.0.positions", empty_slots), one_slot_more], ids=["padding-stored", "one-slot-more"]
)
def test_a_layer_whose_keys_do_not_fill_its_kept_slots_is_refused(cache_file, tmp_path, edit):
    path = rewrite_tensors(cache_file, tmp_path / "ragged.fkv", edit)

    assert "layer 0 has tensors of the wrong shape" in refusal(load_cache, path)


@pytest.mark.parametrize("dtype", ["float32", "int6"])
def test_a_cache_whose_heads_keep_different_counts_stores_only_their_tokens(engine, document, tmp_path, dtype):
    """kvzip's global budget gives the heads of a layer very different counts: the file holds each kept pair once
    and no padding, and loads the same cache (float32 to the bit; int6 within its rounding, zeros where empty)."""
    saved = engine.build([document], BuildPlan(make_method("kvzip", budget="40%", head_budget="global")))
    padded = [i for i, layer in enumerate(saved.cache.layers) if not bool(layer.valid.all())]
    assert padded  # the heads' counts differ somewhere, or this test shows nothing
    path = tmp_path / "c.fkv"

    save_cache(path, saved.cache, saved.manifest, dtype)
    cache = load_cache(path, "cpu", torch.float32)[0]

    per_token = "values" if dtype == "float32" else "values.scale"  # int6 values: one scale per token and group
    with safe_open(str(path), framework="pt") as f:
        for i in padded:
            assert f.get_slice(f"layers.{i}.{per_token}").get_shape()[0] == int(saved.cache.layers[i].valid.sum())
    for loaded, built in zip(cache.layers, saved.cache.layers, strict=True):
        assert torch.equal(loaded.positions, built.positions)
        for x, y in ((loaded.keys, built.keys.float()), (loaded.values, built.values.float())):
            if dtype == "float32":
                assert_bit_equal(x, y)
            else:  # half a step of 63 over a range of at most twice the largest magnitude
                assert not x[built.positions == EMPTY].any()
                assert float((x - y).abs().max()) <= float(y.abs().max()) / 60
