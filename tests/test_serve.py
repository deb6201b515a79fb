"""`fastkv serve` in a subprocess on a free port with a tiny model, used through a real HTTP client and
through the CLI's --server: answers equal the in-process ones, and the server's limits hold."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from fastkv_cli.service import CacheLRU
from tests.helpers import assert_one_line_error, fastkv
from tests.json_schema import SCHEMA, STATS_KEYS
from tests.tiny_models import fastkv_command, save_tiny_llama

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
QUESTION = "When was the lighthouse automated?"
DOC_TEXT = "The Harrow Point lighthouse was automated in 1987.\nThomas Arkwright Bell designed the tower.\n"
WINDOW = 32768  # room for an answer long enough to be still running whatever the machine's load
LONG = 30000  # tokens of an answer that is still being generated when the test acts on it (it is cancelled)
MAX_NEW = 6
DEADLINE_S = 180  # how long a test waits for something that should happen (not a timing assertion)
TIMING_KEYS = {"load_s", "read_s", "tokenize_s", "cache_load_s", "prefill_s", "ttft_s", "decode_tokens_per_s"}


def start_server(model: Path, allow: Path, log: Path, *extra: str, token: str | None = None):
    """`fastkv serve` on a free port (one thread, like the in-process tests) -> (process, its URL)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTKV_")} | {"OMP_NUM_THREADS": "1"}
    if token:
        env["FASTKV_TOKEN"] = token
    command = [*fastkv_command(), "serve", "--model", str(model), "--port", "0", "--allow-dir", str(allow), *extra]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=out, env=env)
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if match := re.search(r"listening on (http://\S+)", log.read_text()):
            return process, match[1]
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"the server did not start:\n{log.read_text()}")


def stop_server(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("serve-model")
    save_tiny_llama(folder, tiny_tokenizer, WINDOW)
    return folder


@pytest.fixture(scope="module")
def allowed(tmp_path_factory) -> Path:
    """The server's --allow-dir, with one document in it."""
    folder = tmp_path_factory.mktemp("allowed")
    (folder / "doc.txt").write_text(DOC_TEXT)
    return folder


@pytest.fixture(scope="module")
def server(model, allowed, tmp_path_factory):
    """One server for the module: a token, a queue of one, 1 MiB bodies."""
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


def answer_fields(answer: dict) -> dict:
    """An answer without its timings: what must be equal between two runs."""
    return {**answer, "stats": {k: v for k, v in answer["stats"].items() if k not in TIMING_KEYS}}


def json_lines(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def ask_body(question: str = QUESTION, max_new_tokens: int = MAX_NEW, path: str = "doc.txt") -> dict:
    return {"documents": [{"path": path}], "question": question, "max_new_tokens": max_new_tokens}


def events(response: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in response.iter_lines() if line.strip()]


def wait_for(condition, what: str):
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- answers equal the in-process ones ------------------------------------------------------------------


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


def test_streamed_events_add_up_to_the_answer(http, model, allowed):
    body = ask_body(max_new_tokens=12, path=str(allowed / "doc.txt"))  # named as the in-process run names it
    with http.stream("POST", "/ask", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        received = events(response)
    texts = [event["text"] for event in received if event["event"] == "text"]
    [answer] = [event["answer"] for event in received if event["event"] == "answer"]
    local = json_lines(
        fastkv("ask", allowed / "doc.txt", QUESTION, "--model", model, "--max-new-tokens", 12, "--json")
    )[0]
    assert len(texts) > 1  # streamed as generated, not sent at the end
    assert "".join(texts) == answer["answer"] == local["answer"]
    assert received[-1]["event"] == "answer"


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


def test_client_imports_no_torch(server, model, allowed):
    """A fresh client process answers through the server without importing torch, transformers or the engine."""
    output = allowed / "client.fkv"
    assert fastkv("cache", "build", allowed / "doc.txt", "-o", output, "--model", model, "--force").exit_code == 0
    probe = (
        "import atexit, sys\n"
        "heavy = ('torch', 'transformers', 'core.engine', 'core.store', 'fastapi', 'uvicorn')\n"
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


# --- security and bad requests ---------------------------------------------------------------------------


def test_token_is_required_on_every_request(server, allowed, model):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for method, path in (("GET", "/health"), ("POST", "/ask"), ("POST", "/v1/chat/completions")):
            response = httpx.request(method, server.url + path, headers=headers, json=ask_body())
            assert response.status_code == 401, (headers, path)
            assert "bearer token" in response.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health", headers=AUTH).status_code == 200
    result = fastkv("ask", allowed / "doc.txt", QUESTION, "--model", model, "--server", server.url)
    assert_one_line_error(result, "bearer token", code=2)


def test_paths_outside_the_allowed_directories_are_refused(http, server, allowed, tmp_path, model, token_env):
    secret = tmp_path / "secret.txt"
    secret.write_text("the secret")
    link = allowed / "link.txt"
    link.unlink(missing_ok=True)
    link.symlink_to(secret)
    refused = [
        ("/ask", ask_body(path=str(secret))),
        ("/ask", ask_body(path=str(link))),
        ("/ask", ask_body(path=f"{allowed}/../{tmp_path.name}/secret.txt")),
        ("/ask", ask_body(path="/etc/passwd")),
        ("/cache/query", {"cache": str(tmp_path / "x.fkv"), "questions": [QUESTION]}),
        ("/cache/info", {"cache": str(secret)}),
        ("/cache/build", {"documents": [{"path": "doc.txt"}], "output": str(tmp_path / "out.fkv")}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Q?"}], "fastkv": {"documents": [str(secret)]}}),
    ]  # fmt: skip
    for path, body in refused:
        response = http.post(path, json=body)
        assert response.status_code == 403, (path, body, response.text)
        assert "outside the directories" in response.json()["error"]["message"]
    assert not (tmp_path / "out.fkv").exists()
    result = fastkv("ask", secret, QUESTION, "--model", model, "--server", server.url)
    assert_one_line_error(result, "outside the directories", code=2)


@pytest.mark.parametrize(
    ("method", "path", "content", "status", "needle"),
    [
        ("POST", "/ask", b"{not json", 400, "JSON"),
        ("POST", "/ask", json.dumps({**ask_body(), "colour": "red"}).encode(), 400, "colour"),
        ("POST", "/ask", json.dumps({**ask_body(), "max_new_tokens": 0}).encode(), 400, "max_new_tokens"),
        ("POST", "/ask", json.dumps({**ask_body(), "budget": "lots"}).encode(), 400, "lots"),
        ("POST", "/ask", json.dumps({**ask_body(), "method": "magic"}).encode(), 400, "unknown method"),
        ("POST", "/ask", json.dumps(ask_body(path="missing.txt")).encode(), 400, "no such file"),
        ("POST", "/ask", json.dumps({"documents": [{"content_base64": "%%%"}], "question": "Q"}).encode(), 400, "base64"),
        ("POST", "/ask", json.dumps({"documents": [{"content": "x" * (2 << 20)}], "question": "Q"}).encode(), 413, "MiB"),
        ("POST", "/cache/query", json.dumps({"cache": "doc.txt", "questions": ["Q"]}).encode(), 400, "doc.txt"),
        ("POST", "/ask", json.dumps({**ask_body(), "model": "other-model"}).encode(), 400, "this server runs"),
        ("GET", "/nowhere", b"", 404, "Not Found"),
        ("GET", "/ask", b"", 405, "Method Not Allowed"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_4xx_json_error(http, method, path, content, status, needle):
    response = http.request(method, path, content=content)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["exit_code"] == 2
    assert "Traceback" not in response.text


# --- one at a time: queue, disconnect, shutdown ---------------------------------------------------------


def counts(http) -> dict:
    return http.get("/health").json()["queue"]


def test_a_request_beyond_the_queue_gets_503(http, server):
    """--queue 1: one request runs, one waits, the third is refused at once."""
    waiting: dict = {}
    with http.stream("POST", "/ask", json=ask_body(max_new_tokens=LONG)) as running:
        assert running.status_code == 200
        lines = running.iter_lines()  # held: a dropped line iterator would close the stream
        next(line for line in lines if '"text"' in line)  # it is generating
        worker = threading.Thread(target=lambda: waiting.update(response=http.post("/ask", json=ask_body())))
        worker.start()
        wait_for(lambda: counts(http)["waiting"] == 1, "the second request to wait")
        refused = http.post("/ask", json=ask_body())
        assert refused.status_code == 503
        assert "busy" in refused.json()["error"]["message"]
    worker.join(DEADLINE_S)  # leaving the first stream cancelled it; the waiting one ran
    assert waiting["response"].status_code == 200
    assert events(waiting["response"])[-1]["event"] == "answer"


def test_a_client_that_leaves_stops_its_generation(http):
    before = counts(http)
    with http.stream("POST", "/ask", json=ask_body(max_new_tokens=LONG)) as response:
        lines = response.iter_lines()
        next(line for line in lines if '"text"' in line)
        assert counts(http)["running"]  # still generating when the client leaves
    after = wait_for(
        lambda: (c := counts(http))["cancelled"] > before["cancelled"] and not c["running"] and c, "the cancel"
    )
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"]  # it was stopped, not finished


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_server_cleanly(model, allowed, tmp_path, sig):
    log = tmp_path / "serve.log"
    process, url = start_server(model, allowed, log)
    try:
        with httpx.Client(base_url=url, timeout=DEADLINE_S) as client:
            with client.stream("POST", "/ask", json=ask_body(max_new_tokens=LONG)) as response:
                lines = response.iter_lines()
                next(line for line in lines if '"text"' in line)
                process.send_signal(sig)
                last = json.loads([line for line in lines if line.strip()][-1])
        code = process.wait(timeout=DEADLINE_S)
    finally:
        if process.poll() is None:
            process.kill()
    assert last["event"] == "error" and "shutting down" in last["error"]["message"]
    assert code == 0, log.read_text()
    assert "stopped" in log.read_text() and "Traceback" not in log.read_text()
    assert not list(allowed.glob(".*.tmp"))  # no half-written cache file


# --- OpenAI-compatible chat ---------------------------------------------------------------------------------


def test_openai_chat_answers_as_ask(http, model, allowed, monkeypatch):
    monkeypatch.chdir(allowed)
    (allowed / "message 1").write_text(DOC_TEXT)
    local = json_lines(fastkv("ask", "message 1", QUESTION, "--model", model, "--max-new-tokens", MAX_NEW, "--json"))
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": DOC_TEXT},
        {"role": "user", "content": QUESTION},
    ]
    # the document as message content: named "message 2" there, so compare with a file of that name
    (allowed / "message 2").write_text(DOC_TEXT)
    as_content = json_lines(
        fastkv("ask", "message 2", QUESTION, "--model", model, "--max-new-tokens", MAX_NEW, "--json")
    )
    body = {"model": "any", "messages": messages, "max_tokens": MAX_NEW}

    reply = http.post("/v1/chat/completions", json=body).json()
    by_path = http.post(
        "/v1/chat/completions",
        json={**body, "messages": messages[-1:], "fastkv": {"documents": ["message 1"]}},
    ).json()
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]

    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["content"] == as_content[0]["answer"]
    assert reply["choices"][0]["finish_reason"] == "length"  # the tiny model never stops by itself
    assert reply["usage"]["completion_tokens"] == MAX_NEW
    assert by_path["choices"][0]["message"]["content"] == local[0]["answer"]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == as_content[0]["answer"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_openai_chat_from_a_saved_cache(http, model, allowed):
    output = allowed / "chat.fkv"
    assert fastkv("cache", "build", allowed / "doc.txt", "-o", output, "--model", model, "--force").exit_code == 0
    [here] = json_lines(fastkv("cache", "query", output, QUESTION, "--max-new-tokens", MAX_NEW, "--json"))
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": MAX_NEW, "fastkv": {"cache": "chat.fkv"}}
    reply = http.post("/v1/chat/completions", json=body).json()
    assert reply["choices"][0]["message"]["content"] == here["answer"]
    assert http.get("/v1/models").json()["data"][0]["object"] == "model"


# --- the cache LRU, without a server --------------------------------------------------------------------


def test_cache_lru_evicts_the_least_recently_used_within_its_budget(tmp_path, monkeypatch):
    loads = []

    def fake_load(path):
        loads.append(path.name)
        return SimpleNamespace(cache=SimpleNamespace(nbytes=int(path.read_text()), paused=None))

    engine = SimpleNamespace(load_saved=fake_load)
    files = {name: tmp_path / name for name in ("a", "b", "c", "huge")}
    for name, size in (("a", 40), ("b", 40), ("c", 40), ("huge", 1000)):
        files[name].write_text(str(size))
    lru = CacheLRU(budget_bytes=100)

    for name in ("a", "b", "a", "c", "a", "b", "huge", "huge"):
        lru.get(files[name], engine=engine)

    # a, b loaded; a hit; c evicts b (least recent); a hit; b evicts c; huge is used but never kept
    assert loads == ["a", "b", "c", "b", "huge", "huge"]
    assert lru.summary() == {"loaded": 2, "bytes": 80, "budget_bytes": 100}
    files["a"].write_text("41")  # rewritten: another size, so it is loaded again
    lru.get(files["a"], engine=engine)
    assert loads[-1] == "a" and lru.summary()["bytes"] == 81


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
