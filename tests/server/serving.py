"""What the server tests share: a `fastkv serve` subprocess on a free port with a tiny model, and small
readers of its answers."""

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from tests.tiny_models import fastkv_command

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


def counts(http: httpx.Client) -> dict:
    return http.get("/health").json()["queue"]
