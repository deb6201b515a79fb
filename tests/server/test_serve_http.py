"""fastkv's routes over HTTP (a `fastkv serve` subprocess with a tiny model): streamed events, the bearer
token on every route, paths held to --allow-dir, and every bad request a 4xx JSON error."""

import json

import httpx
import pytest

from tests.helpers import assert_one_line_error, fastkv
from tests.server.serving import AUTH, QUESTION, TOKEN, ask_body, events, json_lines


def test_streamed_events_add_up_to_the_answer(http, model, allowed):
    body = ask_body(max_new_tokens=12, path=str(allowed / "doc.txt"))  # named as the in-process run names it
    with http.stream("POST", "/ask", json={**body, "ignore_memory": True}) as response:
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
        ("POST", "/ask", json.dumps({**ask_body(), "force": True}).encode(), 400, "force"),  # ask's is ignore_memory
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
