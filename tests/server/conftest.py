"""The server tests' fixtures: one tiny model folder, one --allow-dir with a document, and one server for
the whole directory (a token, a queue of one, 1 MiB bodies)."""

from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from tests.server.serving import AUTH, DEADLINE_S, DOC_TEXT, TOKEN, WINDOW, start_server, stop_server
from tests.tiny_models import save_tiny_llama


@pytest.fixture(scope="session")
def model(tmp_path_factory, tiny_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("serve-model")
    save_tiny_llama(folder, tiny_tokenizer, WINDOW)
    return folder


@pytest.fixture(scope="session")
def allowed(tmp_path_factory) -> Path:
    """The server's --allow-dir, with one document in it."""
    folder = tmp_path_factory.mktemp("allowed")
    (folder / "doc.txt").write_text(DOC_TEXT)
    return folder


@pytest.fixture(scope="session")
def server(model, allowed, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "serve.log"
    process, url = start_server(model, allowed, log, "--queue", "1", "--max-upload-mb", "1", token=TOKEN)
    yield SimpleNamespace(url=url, log=log, process=process)
    assert stop_server(process) == 0, log.read_text()
    assert "Traceback" not in log.read_text()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=DEADLINE_S) as client:
        yield client


@pytest.fixture
def token_env(monkeypatch):
    monkeypatch.setenv("FASTKV_TOKEN", TOKEN)
