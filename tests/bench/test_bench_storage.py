"""bench/storage.py: its in-memory storage is what a file gives back, and its rule picks as it says."""

from dataclasses import replace

import pytest
import storage

from core.storage import load_cache, save_cache
from core.storage.quant import HIDDEN_BITS
from tests.helpers import assert_same_cache, build


@pytest.mark.parametrize("dtype", ["float16", "int4", "int8", "coded"])
def test_the_in_memory_storage_is_the_file_cache_build_writes(engine, document, tmp_path, dtype):
    saved = build(engine, document, budget="20%", query_aware=True)
    path = tmp_path / "c.fkv"
    save_cache(path, saved.cache, saved.manifest, dtype, model=engine.runner)
    from_file, manifest = load_cache(path, engine.loaded.device, engine.loaded.dtype, engine.runner)

    in_memory, nbytes = storage.stored(engine, saved, storage.Storage(dtype, HIDDEN_BITS if dtype == "int4" else None))

    assert_same_cache(in_memory.cache, from_file)
    assert in_memory.manifest.storage == manifest.storage
    assert nbytes < path.stat().st_size < nbytes + 64 * 1024  # the file adds its header alone


def test_added_bits_widen_every_paused_layer_over_the_default_and_nothing_else(engine, document):
    saved = build(engine, document, budget="20%", query_aware=True)
    plain, wider = storage.Storage("int4", HIDDEN_BITS), storage.Storage("int4", HIDDEN_BITS, added_bits=2)
    default = plain.quantization(saved.manifest)

    assert wider.quantization(saved.manifest) == replace(default, layer_bits=tuple(w + 2 for w in default.layer_bits))
    assert len(default.layer_bits) == saved.manifest.paused_layer + 1
    assert plain.label != wider.label  # the records tell them apart
    assert storage.stored(engine, saved, wider)[1] > storage.stored(engine, saved, plain)[1]
    int6 = storage.Storage("int6").quantization(saved.manifest)  # the docs: int6 stores the +2-bit row's widths
    assert replace(int6, bits=4) == wider.quantization(saved.manifest)


def records(storage_label: str, same: list[bool], stored_bytes: int) -> list[dict]:
    return [
        {"group": "doc", "storage": storage_label, "same_as_ask": s, "correct": s, "kl": 0.0,
         "stored_bytes": stored_bytes, "fullkv_bytes": 1000}
        for s in same
    ]  # fmt: skip


def test_the_rule_picks_the_smallest_storage_keeping_nine_answers_in_ten():
    kinds = [storage.Storage("float16"), storage.Storage("int4", 8), storage.Storage("int4", 6)]
    kinds += [storage.Storage("int4", 4)]
    kept, lost = [True] * 9 + [False], [True] * 8 + [False] * 2  # 90% keeps, 80% does not
    data = records(kinds[0].label, [True] * 10, 640) + records(kinds[1].label, kept, 220)
    data += records(kinds[2].label, kept, 200) + records(kinds[3].label, lost, 180)
    results = [storage.Result.of(data, kind) for kind in kinds]

    assert [r.share for r in results] == [64.0, 22.0, 20.0, 18.0]
    assert storage.choice(results, "tuning").endswith(": int4, hidden states at 6 bits")
    assert storage.choice(results[3:], "tuning").endswith(": none")


def test_the_held_out_half_chooses_nothing_and_lists_the_storages_meeting_the_bar():
    kinds = [storage.Storage("float16"), storage.Storage("int4", 8), storage.Storage("int4", 4)]
    data = records(kinds[0].label, [True] * 10, 640) + records(kinds[1].label, [True] * 9 + [False], 220)
    data += records(kinds[2].label, [True] * 8 + [False] * 2, 180)
    results = [storage.Result.of(data, kind) for kind in kinds]

    line = storage.choice(results, "held-out")
    assert "nothing chosen" in line and "smallest" not in line
    assert line.endswith(": int4, hidden states at 8 bits; float16")
    assert storage.choice(results[2:], "held-out").endswith(": none")


def test_the_frontier_plot_writes_a_png(tmp_path):
    kinds = [storage.Storage("float16"), storage.Storage("int4", HIDDEN_BITS), storage.Storage("int8")]
    data = records(kinds[0].label, [True] * 10, 640) + records(kinds[1].label, [True] * 8 + [False] * 2, 197)
    data += records(kinds[2].label, [True] * 10, 340)
    path = tmp_path / "frontier.png"

    storage.plot([storage.Result.of(data, kind) for kind in kinds], "frontier", path)

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_documents_narrow_one_half_to_their_questions():
    half = storage.questions("held-out")
    chosen = ["bench/texts/gpl-2.0.txt", "examples/lighthouse.md"]
    narrowed = storage.questions("held-out", chosen)
    assert narrowed == [item for item in half if item.group in chosen]
    assert {item.group for item in narrowed} == set(chosen)
    assert {item.group for item in half} > set(chosen)
    assert all(item.half == "held-out" for item in narrowed)
