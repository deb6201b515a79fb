"""The CLI through --server (a `fastkv serve` subprocess with a tiny model): answers equal the in-process
ones, a server is chosen as asked, and what goes wrong is one line."""

import json
import os
import socket
import subprocess
import sys

import httpx

from tests.helpers import assert_one_line_error, fastkv
from tests.json_schema import SCHEMA, STATS_KEYS
from tests.server.serving import AUTH, DOC_TEXT, MAX_NEW, QUESTION, TOKEN, answer_fields, free_port, json_lines


def test_ask_through_the_server_equals_in_process(server, model, allowed, token_env):
    doc = allowed / "doc.txt"
    args = ["ask", doc, QUESTION, "--model", model, "--max-new-tokens", MAX_NEW]

    local, remote = fastkv(*args, "--json"), fastkv(*args, "--json", "--server", server.url)
    plain_local, plain_remote = fastkv(*args, "--quiet"), fastkv(*args, "--quiet", "--server", server.url)

    [here], [there] = json_lines(local), json_lines(remote)
    assert set(there) >= SCHEMA and set(there["stats"]) >= STATS_KEYS
    assert answer_fields(there) == answer_fields(here)
    assert plain_remote.exit_code == 0, plain_remote.output
    assert plain_remote.stdout == plain_local.stdout == here["answer"] + "\n"


def test_stdin_document_is_uploaded(server, model, token_env):
    args = ["ask", "-", QUESTION, "--model", model, "--max-new-tokens", MAX_NEW, "--json"]
    [here], [there] = (
        json_lines(fastkv(*args, input=DOC_TEXT)),
        json_lines(fastkv(*args, "--server", server.url, input=DOC_TEXT)),
    )
    assert there["documents"][0]["name"] == "<stdin>"
    assert answer_fields(there) == answer_fields(here)


def test_cache_build_query_and_info_through_the_server(server, model, allowed, token_env):
    output = allowed / "doc.fkv"
    built = fastkv("cache", "build", allowed / "doc.txt", "-o", output, "--model", model, "--json", "--force",
                   "--server", server.url)  # fmt: skip
    [summary] = json_lines(built)
    assert summary["output"] == str(output) and summary["file_bytes"] == output.stat().st_size
    questions = [QUESTION, "Who designed the tower?"]
    query = ["cache", "query", output, *questions, "--max-new-tokens", MAX_NEW, "--json"]

    here, there = json_lines(fastkv(*query)), json_lines(fastkv(*query, "--server", server.url))
    from_stdin = json_lines(fastkv(*query[:3], *query[5:], "--server", server.url, input="\n".join(questions)))

    assert (
        [answer_fields(a) for a in there] == [answer_fields(a) for a in here] == [answer_fields(a) for a in from_stdin]
    )
    assert [a["question"] for a in there] == questions
    info_here, info_there = (
        fastkv("cache", "info", output, "--json", *extra) for extra in ([], ["--server", server.url])
    )
    assert json_lines(info_there) == json_lines(info_here)


def test_cache_query_through_the_server_reports_only_the_loads_it_did(server, model, allowed, token_env):
    output = allowed / "loads.fkv"  # a file of its own: not in the server's memory yet
    assert fastkv("cache", "build", allowed / "doc.txt", "-o", output, "--model", model, "--force").exit_code == 0
    questions = [QUESTION, "Who designed the tower?", "When?"]
    query = ["cache", "query", output, *questions, "--max-new-tokens", MAX_NEW, "--server", server.url]

    first = fastkv(*query, "--json")  # the server reads the file for the first question, then keeps it
    again = fastkv(*query)  # in the server's memory now: nothing to load

    stats = [answer["stats"] for answer in json_lines(first)]
    assert [s["load_s"] for s in stats] == [None] * 3  # the server loaded its model before any request
    assert isinstance(stats[0]["cache_load_s"], float) and [s["cache_load_s"] for s in stats[1:]] == [None] * 2
    assert all(isinstance(s["ttft_s"], float) for s in stats)  # each answer's own
    assert first.stderr.count("cache load") == 1 and "model load" not in first.stderr
    assert first.stderr.count("time to first token") == 3
    assert again.exit_code == 0, again.output
    assert "cache load" not in again.stderr and "model load" not in again.stderr
    assert again.stderr.count("time to first token") == 3


def test_client_imports_no_torch(server, model, allowed):
    """A fresh client process answers through the server without importing torch, transformers or the engine."""
    output = allowed / "client.fkv"
    assert fastkv("cache", "build", allowed / "doc.txt", "-o", output, "--model", model, "--force").exit_code == 0
    probe = (
        "import atexit, sys\n"
        "heavy = ('torch', 'transformers', 'core.engine', 'core.storage', 'fastapi', 'uvicorn')\n"
        "atexit.register(lambda: sys.stderr.write('HEAVY=' + ','.join(m for m in heavy if m in sys.modules) + '\\n'))\n"
        "from fastkv_cli.app import app\n"
        "app()\n"
    )
    args = ["cache", "query", str(output), QUESTION, "--max-new-tokens", str(MAX_NEW), "--json"]
    env = {**os.environ, "FASTKV_SERVER": server.url, "FASTKV_TOKEN": TOKEN}
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, env=env, check=False)

    assert done.returncode == 0, done.stderr
    assert "HEAVY=\n" in done.stderr  # nothing heavy was imported
    [here] = json_lines(fastkv(*args))
    assert answer_fields(json.loads(done.stdout)) == answer_fields(here)


# --- choosing a server --------------------------------------------------------------------------------


def test_unreachable_server_is_one_line_and_exit_1(allowed, model, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    args = ["ask", allowed / "doc.txt", QUESTION, "--model", model, "--max-new-tokens", MAX_NEW]

    assert_one_line_error(fastkv(*args, "--server", dead), "cannot reach the fastkv server", dead, code=1)
    monkeypatch.setenv("FASTKV_SERVER", dead)
    assert_one_line_error(fastkv(*args), "cannot reach the fastkv server", code=1)
    local = fastkv(*args, "--server", "auto", "--json")  # no server answers: runs here
    off = fastkv(*args, "--server", "off", "--json")
    assert answer_fields(json_lines(local)[0]) == answer_fields(json_lines(off)[0])
    assert_one_line_error(fastkv(*args, "--server", "ftp://x"), "not an http:// URL", code=2)


def test_auto_uses_a_server_that_answers(server, allowed, model, monkeypatch, token_env):
    monkeypatch.setenv("FASTKV_SERVER", server.url)
    before = httpx.get(f"{server.url}/health", headers=AUTH).json()["queue"]["completed"]
    result = fastkv("ask", allowed / "doc.txt", QUESTION, "--model", model, "--max-new-tokens", 2, "--server", "auto")
    assert result.exit_code == 0, result.output
    assert httpx.get(f"{server.url}/health", headers=AUTH).json()["queue"]["completed"] == before + 1


def test_a_request_for_another_model_device_or_dtype_is_refused(server, model, allowed, monkeypatch, token_env):
    monkeypatch.chdir(model.parent)
    args = ["ask", allowed / "doc.txt", QUESTION, "--max-new-tokens", 2, "--server", server.url]
    assert fastkv(*args, "--model", model.name).exit_code == 0  # the server's model, as a relative path here
    assert_one_line_error(fastkv(*args, "--device", "cuda"), "this server runs on --device cpu", code=2)
    assert_one_line_error(fastkv(*args, "--dtype", "bfloat16"), "--dtype float32", code=2)
    monkeypatch.setenv("FASTKV_MODEL", str(allowed))  # as in-process, the default model is $FASTKV_MODEL's
    assert_one_line_error(fastkv(*args), "this server runs", code=2)


def test_a_port_in_use_or_a_missing_allow_dir_is_one_line_before_the_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = fastkv("serve", "--port", port, "--model", tmp_path / "no-model")  # refused before the load
    assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}", "in use", code=1)
    result = fastkv("serve", "--port", 0, "--allow-dir", tmp_path / "missing")
    assert_one_line_error(result, "--allow-dir", "not a directory", code=2)
