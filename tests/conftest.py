"""Shared fixtures: tiny random models of every supported family, a tiny tokenizer, saved model folders, and
the saved contexts of one tiny document."""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from core.documents import Document
from core.engine import Engine, SavedContext
from core.models import load_model
from tests.helpers import PAGES, build, make_document
from tests.tiny_models import (
    BUILD_WINDOW,
    CLI_WINDOW,
    FAMILIES,
    build_tiny_model,
    build_tiny_tokenizer,
    save_tiny_gpt2,
    save_tiny_llama,
)

torch.set_num_threads(1)  # tiny tensors: extra threads only add overhead, badly so on a shared machine


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch):
    """No test sees the developer's FASTKV_DEBUG (errors must be one line, not a traceback),
    FASTKV_MODEL, FASTKV_SERVER or FASTKV_TOKEN; subprocesses inherit the cleaned environment."""
    for name in ("FASTKV_DEBUG", "FASTKV_MODEL", "FASTKV_SERVER", "FASTKV_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def tiny_models() -> dict:
    """Every family's tiny model (tests.tiny_models.FAMILIES), each with its own seed, built once."""
    return {family: build_tiny_model(family, seed) for seed, family in enumerate(FAMILIES)}


@pytest.fixture(params=list(FAMILIES))
def tiny_model(request, tiny_models):
    """Parametrizes a test over llama, mistral, qwen2, qwen3 and a llama with llama3 rope scaling."""
    return tiny_models[request.param]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@dataclass(frozen=True)
class TinyModelFolder:
    path: Path
    window: int  # its context window (max_position_embeddings)


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory, tiny_tokenizer) -> TinyModelFolder:
    """A saved tiny Llama + tokenizer for `fastkv ... --model FOLDER`."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(folder, tiny_tokenizer, CLI_WINDOW)
    return TinyModelFolder(folder, CLI_WINDOW)


@pytest.fixture(scope="session")
def build_model_folder(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny Llama with a window of BUILD_WINDOW tokens, for `fastkv cache build --model FOLDER`."""
    folder = tmp_path_factory.mktemp("tiny-llama-build")
    save_tiny_llama(folder, tiny_tokenizer, BUILD_WINDOW)
    return folder


@pytest.fixture
def wide_terminal(monkeypatch):
    """Rich tables 200 columns wide: no wrapping of long temporary paths."""
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture(scope="session")
def unsupported_model_folder(tmp_path_factory, tiny_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    save_tiny_gpt2(folder, tiny_tokenizer)
    return folder


# saved contexts of one tiny document, built once per test module (the storage tests, tests/storage/)
@pytest.fixture(scope="module")
def engine(tiny_model_folder) -> Engine:
    """The saved tiny Llama (tiny_model_folder), float32 on the CPU, loaded once per test module."""
    return Engine(load_model(str(tiny_model_folder.path), device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def document() -> Document:
    """The tiny saved contexts' document: `saved` and `query_aware` are built from it once per test module."""
    return make_document(PAGES)


@pytest.fixture(scope="module")
def saved(engine, document) -> SavedContext:
    return build(engine, document)


@pytest.fixture(scope="module")
def query_aware(engine, document) -> SavedContext:
    return build(engine, document, budget="20%", query_aware=True)
