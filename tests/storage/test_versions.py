"""Only the current cache format is read: a file of any other version, given to the API or to `fastkv cache
info`/`cache query`, is refused in one line naming its version and saying to rebuild it (exit 2)."""

from pathlib import Path

import pytest

from core.storage import FORMAT_VERSION, describe_cache, load_cache, read_manifest, save_cache
from tests.helpers import assert_one_line_error, fastkv
from tests.storage.rewrite import refusal, rewrite_manifest

LACKED = {1: ("paused_layer", "policy", "quantization"), 2: ("policy", "quantization"), 3: ("quantization",)}
OTHER_VERSIONS = [*range(1, FORMAT_VERSION), FORMAT_VERSION + 1]


def refused(version: int) -> str:
    only = f"this fastkv reads only version {FORMAT_VERSION}"
    return f"cache format version {version}; {only}: rebuild it with `fastkv cache build`"


@pytest.fixture(scope="module")
def current_file(tmp_path_factory, saved) -> Path:
    path = tmp_path_factory.mktemp("versions") / "current.fkv"
    save_cache(path, saved.cache, saved.manifest, "int6")
    return path


def as_version(version: int):
    """A manifest as a file of `version` held it, without the fields that version did not have yet."""

    def edit(manifest):
        manifest["format_version"] = version
        for key in LACKED.get(version, ()):
            del manifest[key]

    return edit


def test_the_current_version_is_read(current_file):
    assert read_manifest(current_file).to_dict()["format_version"] == FORMAT_VERSION


@pytest.mark.parametrize("version", OTHER_VERSIONS)
def test_a_file_of_another_version_is_refused_naming_it(current_file, tmp_path, version):
    path = rewrite_manifest(current_file, tmp_path / f"v{version}.fkv", as_version(version))

    for read in (read_manifest, load_cache, describe_cache):
        assert refusal(read, path) == refused(version)


@pytest.mark.parametrize("version", [1, 11, FORMAT_VERSION + 1])
@pytest.mark.parametrize("command", ["info", "query", "query --model"])
def test_the_cli_refuses_a_file_of_another_version_in_one_line_with_exit_2(
    current_file, tmp_path, tiny_model_folder, command, version
):
    path = rewrite_manifest(current_file, tmp_path / f"v{version}.fkv", as_version(version))
    args = ["cache", "info", path] if command == "info" else ["cache", "query", path, "When?"]
    if command.endswith("--model"):
        args += ["--model", tiny_model_folder.path]

    assert_one_line_error(fastkv(*args), f"error: {path}: {refused(version)}")
