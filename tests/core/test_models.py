"""Model resolution and loading without the real model: dtype/device, support checks, env, caches."""

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, Qwen2Config

from core import models
from core.errors import ModelError
from core.models import (
    check_supported,
    gguf_sha256,
    load_model,
    resolve_device,
    resolve_dtype,
    user_cache_dir,
)
from core.runner import Runner
from tests.tiny_models import FAMILIES, TINY_SIZES

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("name", "dtype"), [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)]
)
def test_resolve_dtype_by_name(name, dtype):
    assert resolve_dtype(name, CPU) is dtype


def test_default_dtype_is_float32_on_cpu_and_bfloat16_on_cuda():
    assert resolve_dtype(None, CPU) is torch.float32
    assert resolve_dtype(None, torch.device("cuda")) is torch.bfloat16


def test_unknown_dtype_names_the_choices():
    with pytest.raises(ModelError, match="unknown dtype 'int8'.*float32, bfloat16, float16"):
        resolve_dtype("int8", CPU)


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelError, match="unknown device 'quantum'"):
        resolve_device("quantum")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_model_error():
    with pytest.raises(ModelError, match="no CUDA device"):
        resolve_device("cuda")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_supported_families_pass_the_check(family):
    check_supported(FAMILIES[family]())


def test_unsupported_model_type_names_the_supported_ones():
    with pytest.raises(ModelError) as caught:
        check_supported(GPT2Config())

    message = str(caught.value)
    assert "'gpt2'" in message
    for model_type in ("llama", "mistral", "qwen2", "qwen3"):
        assert model_type in message


def test_runner_refuses_an_unsupported_model():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))

    with pytest.raises(ModelError, match="gpt2"):
        Runner(model)


def test_fastkv_model_env_sets_the_default(monkeypatch, tiny_model_folder):
    monkeypatch.setenv("FASTKV_MODEL", str(tiny_model_folder.path))

    loaded = load_model(device="cpu")

    assert loaded.folder == tiny_model_folder.path
    assert loaded.name == str(tiny_model_folder.path)
    assert loaded.config.model_type == "llama"
    assert loaded.context_window == tiny_model_folder.window
    assert loaded.dtype == torch.float32
    assert not loaded.model.training


def test_explicit_model_wins_over_the_env(monkeypatch, tiny_model_folder, tmp_path):
    monkeypatch.setenv("FASTKV_MODEL", str(tmp_path / "not-this-one"))

    assert load_model(str(tiny_model_folder.path), device="cpu").folder == tiny_model_folder.path


def test_load_in_a_smaller_dtype(tiny_model_folder):
    assert load_model(str(tiny_model_folder.path), device="cpu", dtype="bfloat16").dtype == torch.bfloat16


def test_missing_gguf_file_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="no such GGUF file"):
        load_model(str(tmp_path / "model.gguf"))


def test_folder_without_a_config_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="not a loadable model folder"):
        load_model(str(tmp_path))


@pytest.mark.parametrize(
    ("config", "window"),
    [
        (MistralConfig(**TINY_SIZES, sliding_window=256), 256),
        (MistralConfig(**TINY_SIZES, sliding_window=None), 1024),
        (Qwen2Config(**TINY_SIZES, sliding_window=256, use_sliding_window=False), 1024),
    ],
    ids=["mistral-sliding", "mistral-full", "qwen2-sliding-off"],
)
def test_context_window_is_the_sliding_window_when_one_is_used(config, window):
    loaded = models.LoadedModel(SimpleNamespace(config=config), tokenizer=None, name="m", folder=Path())

    assert loaded.context_window == window


def test_user_cache_dir_honours_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    assert user_cache_dir() == tmp_path / "xdg" / "fastkv"


def test_user_cache_dir_defaults_to_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))

    assert user_cache_dir() == tmp_path / ".cache" / "fastkv"


def test_gguf_sha256_is_memoised_until_the_file_changes(monkeypatch, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    calls = []

    def counting_sha256(path: Path) -> str:
        calls.append(path)
        return real_sha256(path)

    real_sha256 = models.file_sha256
    monkeypatch.setattr(models, "file_sha256", counting_sha256)
    cache_dir = tmp_path / "cache"

    first = gguf_sha256(gguf, cache_dir)
    second = gguf_sha256(gguf, cache_dir)

    assert first == second == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert len(calls) == 1  # the second call read the memo, not the file

    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 11)  # a different size: a new file
    third = gguf_sha256(gguf, cache_dir)

    assert third == hashlib.sha256(gguf.read_bytes()).hexdigest() != first
    assert len(calls) == 2
