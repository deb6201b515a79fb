"""The CLI's path through a running `fastkv serve` (--server URL or $FASTKV_SERVER): the same commands,
output and exit codes as in-process, over the stdlib's http.client, importing no torch (DESIGN.md §1).

Documents go as paths, made absolute here and resolved on the server (inside its --allow-dir); `-`
(stdin) is read here and uploaded. $FASTKV_TOKEN is sent as a bearer token when set.
"""

import base64
import http.client
import json
import os
import sys
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace

from core.errors import FastKVError, InputError
from fastkv_cli.inputs import read_questions, stdin_questions
from fastkv_cli.render import progress_reporter, show, show_built, show_info, stream_to_stdout

DEFAULT_URL = "http://127.0.0.1:8765"
LOCAL = ("off", "local", "none")  # --server off: run here even when $FASTKV_SERVER is set
AUTO = "auto"
PROBE_TIMEOUT_S = 1.0
MAX_UPLOAD = 1 << 30  # what the client reads of stdin at most; the server has its own, smaller limit
STDIN_NAME = "<stdin>"


class ServerError(FastKVError):
    """A failure reported by the server, or no server to report it: its line and exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def connect(choice: str) -> "Client | None":
    """The client for `choice` (a URL, `auto`, or `off`); None means: run in this process.

    `auto` uses $FASTKV_SERVER's URL (else DEFAULT_URL) if a server answers there, and runs here otherwise.
    """
    if choice.lower() in LOCAL:
        return None
    if choice.lower() == AUTO:
        env = os.environ.get("FASTKV_SERVER", "")
        client = Client(env if env and env.lower() not in (AUTO, *LOCAL) else DEFAULT_URL)
        return client if client.answers() else None
    return Client(choice)


class Client:
    def __init__(self, url: str):
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"--server: {url!r} is not an http:// URL (or auto, or off)")
        try:
            port = parts.port
        except ValueError:
            raise InputError(f"--server: {url!r} has a bad port") from None
        self.url, self.scheme, self.host, self.port = url, parts.scheme, parts.hostname, port
        self.prefix = parts.path.rstrip("/")
        self.token = os.environ.get("FASTKV_TOKEN") or None

    def connection(self, timeout: float | None = None) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return kind(self.host, self.port, timeout=timeout)

    def headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/x-ndjson, application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def answers(self) -> bool:
        """Whether something answers HTTP at the URL (any status: a wrong token still means a server)."""
        try:
            conn = self.connection(PROBE_TIMEOUT_S)
            conn.request("GET", self.prefix + "/health", headers=self.headers())
            conn.getresponse().read()
            conn.close()
            return True
        except (OSError, http.client.HTTPException):
            return False

    def request(self, path: str, body: dict) -> http.client.HTTPResponse:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        try:
            conn = self.connection()
            conn.request("POST", self.prefix + path, body=data, headers=self.headers())
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as error:
            reason = (
                error.strerror if isinstance(error, OSError) and error.strerror else str(error) or type(error).__name__
            )
            raise ServerError(
                f"cannot reach the fastkv server at {self.url} ({reason}); start one with `fastkv serve`, "
                "or pass --server auto to run here when none answers"
            ) from None
        if response.status >= 400:
            raise http_error(response)
        return response

    def events(self, path: str, body: dict) -> Iterator[dict]:
        """The server's JSON-lines events for one request; an error event raises its ServerError."""
        response = self.request(path, body)
        try:
            for line in response:
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("event") == "error":
                    raise ServerError(event["error"]["message"], event["error"]["exit_code"])
                yield event
        except (OSError, http.client.HTTPException, ValueError) as error:
            raise ServerError(f"the fastkv server at {self.url} broke off the answer ({error})") from None
        finally:
            response.close()

    def json(self, path: str, body: dict) -> dict:
        response = self.request(path, body)
        try:
            return json.loads(response.read())
        except (OSError, http.client.HTTPException, ValueError) as error:
            raise ServerError(f"the fastkv server at {self.url} sent no valid answer ({error})") from None


def http_error(response: http.client.HTTPResponse) -> ServerError:
    """The server's JSON error as one line with its exit code (4xx: bad input, 2; else 1)."""
    raw = response.read()
    try:
        error = json.loads(raw)["error"]
        return ServerError(error["message"], error.get("exit_code", 2 if response.status < 500 else 1))
    except (ValueError, KeyError, TypeError):
        text = raw.decode("utf-8", "replace").strip().splitlines()
        return ServerError(
            f"server: HTTP {response.status} {(text or [response.reason])[0]}", 2 if response.status < 500 else 1
        )


# --- the commands, through the server -------------------------------------------------------------------


def document_refs(paths: list[str]) -> list[dict]:
    """Paths as the server needs them (absolute; named as typed, since names are part of the prompt);
    stdin read here and uploaded."""
    if paths.count("-") > 1:
        raise InputError("-: stdin can be read only once; give '-' a single time")
    return [
        stdin_upload() if path == "-" else {"path": os.path.abspath(path) if path else path, "name": path}
        for path in paths
    ]


def stdin_upload() -> dict:
    stream = getattr(sys.stdin, "buffer", None)
    try:
        data = stream.read(MAX_UPLOAD + 1) if stream is not None else b""
    except OSError as error:
        raise InputError(f"{STDIN_NAME}: cannot read ({error.strerror or error})") from None
    if len(data) > MAX_UPLOAD:
        raise InputError(f"{STDIN_NAME}: more than {MAX_UPLOAD >> 20} MiB; pass the server a file path instead")
    return {"name": STDIN_NAME, "content_base64": base64.b64encode(data).decode("ascii")}


def answer_view(answer: dict) -> SimpleNamespace:
    """An answer dict with the attributes render.show reads from core's Answer."""
    return SimpleNamespace(
        text=answer["answer"], model=answer["model"], method=answer["method"],
        stats=SimpleNamespace(**answer["stats"]), to_dict=lambda: answer,
    )  # fmt: skip


def print_answers(events: Iterable[dict], json_output: bool, quiet: bool) -> None:
    """Render events as the in-process command does: progress bars, streamed text, then each answer."""
    with progress_reporter(quiet) as progress:
        for event in events:
            if event["event"] == "progress":
                progress(event["step"], event["done"], event["total"])
            elif event["event"] == "text" and not json_output:
                stream_to_stdout(event["text"])
            elif event["event"] == "answer":
                show(answer_view(event["answer"]), json_output, quiet)


def options_body(options: dict, model_from_env: bool = True) -> dict:
    """The command's options as JSON. The model, as in-process, defaults to $FASTKV_MODEL (except for
    `cache query`, whose default is the file's); a path is made absolute for the server to compare."""
    body = {key: str(value) if isinstance(value, Path) else value for key, value in options.items()}
    model = body.get("model") or (os.environ.get("FASTKV_MODEL") if model_from_env else None) or None
    if "model" in body:
        body["model"] = os.path.abspath(model) if model and os.path.exists(model) else model
    return body


def ask(client: Client, documents: list[str], question: str, json: bool, quiet: bool, **options) -> None:
    body = {"documents": document_refs(documents), "question": question, **options_body(options)}
    print_answers(client.events("/ask", body), json, quiet)


def cache_build(
    client: Client, documents: list[str], output: Path, questions: Path | None, json: bool, quiet: bool, **options
) -> None:
    body = {
        "documents": document_refs(documents),
        "output": os.path.abspath(output),
        "questions": read_questions(questions) if questions else [],
        **options_body(options),
    }
    summary = None
    with progress_reporter(quiet) as progress:
        for event in client.events("/cache/build", body):
            if event["event"] == "progress":
                progress(event["step"], event["done"], event["total"])
            elif event["event"] == "result":
                summary = {**event["result"], "output": str(output)}
    if summary is None:
        raise ServerError(f"the fastkv server at {client.url} ended without a result")
    show_built(summary, json, quiet)


def cache_query(
    client: Client, cache_file: Path, questions: list[str] | None, json: bool, quiet: bool, **options
) -> None:
    """One request per question, so questions from stdin are answered as they arrive; the server keeps
    the cache loaded between them."""
    body = {"cache": os.path.abspath(cache_file), **options_body(options, model_from_env=False)}
    for question in questions or stdin_questions():
        print_answers(client.events("/cache/query", {**body, "questions": [question]}), json, quiet)


def cache_info(client: Client, cache_file: Path, json: bool) -> None:
    show_info({**client.json("/cache/info", {"cache": os.path.abspath(cache_file)}), "file": str(cache_file)}, json)
