"""The typed manifest: one parse and one serialisation that round-trip, the JSON a file holds key for key, the
kind of each cache, and a refusal naming the field."""

import json
from dataclasses import replace

import pytest
from safetensors import safe_open

from core.errors import CacheFileError
from core.storage import FORMAT_VERSION, MANIFEST_KEY, Manifest, load_cache, read_manifest, save_cache
from tests.helpers import build

KINDS = {"question-blind": {}, "two-stage": {"query_budget": "20%"}, "query-aware": {"query_aware": True}}
STORAGES = {"question-blind": "int6", "two-stage": "bfloat16", "query-aware": "coded"}


@pytest.fixture(scope="module", params=list(KINDS))
def saved_file(request, engine, document, tmp_path_factory):
    """(kind, the built context, its file) for each kind of cache, in a storage of its own."""
    built = build(engine, document, budget="30%", **KINDS[request.param])
    path = tmp_path_factory.mktemp("manifest") / f"{request.param}.fkv"
    save_cache(path, built.cache, built.manifest, STORAGES[request.param], model=engine.runner)
    return request.param, built, path


def test_a_manifest_parses_back_from_its_dict_to_itself(saved_file):
    _, _, path = saved_file
    manifest = read_manifest(path)

    assert Manifest.from_dict(manifest.to_dict()) == manifest
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest


def test_the_dict_is_the_json_the_file_holds_key_for_key(saved_file):
    _, _, path = saved_file
    with safe_open(str(path), framework="pt") as f:
        stored = json.loads(f.metadata()[MANIFEST_KEY])

    assert json.dumps(read_manifest(path).to_dict()) == json.dumps(stored)  # the same keys in the same order
    assert stored["format_version"] == FORMAT_VERSION


def test_a_loaded_manifest_is_the_built_one_with_its_storage(saved_file):
    kind, built, path = saved_file
    manifest = load_cache(path)[1]

    assert built.manifest.storage is None and manifest.storage.dtype == STORAGES[kind]
    assert replace(manifest, storage=None) == built.manifest
    assert manifest.kind == built.manifest.kind == kind


def test_a_built_manifest_has_no_storage_fields_and_is_no_file_manifest(saved):
    data = saved.manifest.to_dict()

    assert not {"format_version", "dtype", "quantization", "tensors_sha256"} & set(data)
    with pytest.raises(CacheFileError, match="cache format version None"):
        Manifest.from_dict(data)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["model"].update(num_layers="4"), "manifest.model.num_layers should be int, not str"),
        (lambda m: m["model"].update(num_heads=True), "manifest.model.num_heads should be int, not bool"),
        (lambda m: m["model"].update(spec=3), "manifest.model.spec should be str or NoneType, not int"),
        (lambda m: m["method"].update(parameters=[]), "manifest.method.parameters should be dict, not list"),
        (lambda m: m["documents"][0].pop("size"), "manifest.documents[0].size is missing"),
        (lambda m: m["template"].update(tail=None), "manifest.template.tail should be str, not NoneType"),
        (lambda m: m.update(policy={"budget_tokens": -1}), "manifest.policy.budget_tokens should be a token count"),
        (lambda m: m["model"].update(head_dim=0), "manifest.model.head_dim should be at least 1, not 0"),
        (lambda m: m.update(dropped_tokens=-3), "manifest.dropped_tokens should not be negative, not -3"),
    ],
)
def test_a_bad_field_is_refused_naming_it(saved, tmp_path, edit, message):
    path = tmp_path / "c.fkv"
    save_cache(path, saved.cache, saved.manifest, "float16")
    data = read_manifest(path).to_dict()
    edit(data)

    with pytest.raises(CacheFileError) as error:
        Manifest.from_dict(data)
    assert str(error.value).startswith(message)
