"""OpenAI's chat API on `fastkv serve`: a chat completion answers as `fastkv ask` (whole or streamed as SSE
chunks), or as `cache query` from a saved cache."""

import json

from tests.helpers import fastkv
from tests.server.serving import DOC_TEXT, MAX_NEW, QUESTION, json_lines


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
