"""`fastkv serve`: one loaded model over HTTP. ask, cache build/query/info take the CLI's options and
answer in its JSON schema, streamed as newline-delimited JSON events; POST /v1/chat/completions speaks
OpenAI's chat API. Requests run one at a time on the model (service.Worker); see README "Server"."""

import asyncio
import base64
import binascii
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from core import __version__
from core.engine import Engine
from core.errors import FastKVError, InputError
from core.generation import Decoding, Sampling
from core.methods import DEFAULT_METHOD, Budget
from core.options import BuildOptions, MethodOptions
from core.store import check_target, describe_cache
from fastkv_cli.service import (
    END,
    CacheLRU,
    Job,
    RequestError,
    Settings,
    Worker,
    error_event,
    named_document,
    uploaded_document,
)

NDJSON = "application/x-ndjson"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
DISCONNECT_POLL_S = 0.25
CLIENT_LEFT = 499  # nginx's status for a request whose client closed the connection: nobody reads it  # how often a request waiting in the queue checks that its client is still there


# --- requests: the CLI's options by the same names ---------------------------------------------------


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DocumentIn(Body):
    """A file on the server (`path`, named `name` as the client typed it) or an upload (`content` as
    text, `content_base64` as raw bytes: a PDF or text) named `name` (default "<stdin>")."""

    path: str | None = None
    name: str | None = None
    content: str | None = None
    content_base64: str | None = None


class ModelChoice(Body):
    """The server runs one model; a request naming another model, device or dtype is refused."""

    model: str | None = None
    device: str | None = None
    dtype: str | None = None


class DecodingIn(ModelChoice):
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    seed: int | None = None

    def decoding(self) -> Decoding:
        return Decoding(self.max_new_tokens, Sampling(self.temperature, self.top_p, self.seed))


class MethodIn(Body):
    method: str = DEFAULT_METHOD
    budget: str | None = None
    tsp_layer: int | None = None
    tsp_rate: str | None = None
    pooling: str | None = None
    window: int | None = None

    def method_options(self) -> MethodOptions:
        fields = ("budget", "tsp_layer", "tsp_rate", "pooling", "window", "filter_layer")
        return MethodOptions(self.method, **{key: getattr(self, key, None) for key in fields})


class AskIn(DecodingIn, MethodIn):
    documents: list[DocumentIn] = Field(min_length=1)
    question: str
    filter_layer: int | None = None
    truncate: str | None = None
    ignore_memory: bool = False


class BuildIn(ModelChoice, MethodIn):
    documents: list[DocumentIn] = Field(min_length=1)
    output: str
    force: bool = False
    query_budget: str | None = None
    questions: list[str] = []
    query_aware: bool | None = None  # None: query-aware where the method can pause (the CLI's default)
    cache_dtype: str | None = None  # None: the CLI's default (store.storage_for)
    truncate: str | None = None
    ignore_memory: bool = False

    def build_options(self) -> BuildOptions:
        return BuildOptions(
            self.method_options(), self.query_budget, tuple(self.questions), self.query_aware, self.cache_dtype,
            self.truncate, self.ignore_memory,
        )  # fmt: skip


class QueryIn(DecodingIn):
    cache: str
    questions: list[str] = Field(min_length=1)
    budget: str | None = None


class InfoIn(Body):
    cache: str


# --- the server -----------------------------------------------------------------------------------------


class Service:
    """The loaded engine with what serves it: settings, the model worker, the cache LRU."""

    def __init__(self, engine: Engine, settings: Settings):
        self.engine = engine
        self.settings = settings
        self.worker = Worker(settings.queue_size)
        self.caches = CacheLRU(settings.cache_memory_bytes)

    def check_model(self, choice: ModelChoice) -> None:
        loaded = self.engine.loaded
        if choice.model is not None and not same_model(choice.model, loaded.spec, loaded.name):
            raise RequestError(400, f"this server runs {loaded.name}; start one with --model {choice.model} for it")
        for name, wanted, actual in (
            ("device", choice.device, loaded.device.type),
            ("dtype", choice.dtype, dtype_name(loaded.dtype)),
        ):
            if wanted is not None and wanted != actual:
                raise RequestError(400, f"this server runs on --{name} {actual}; start one with --{name} {wanted}")

    def documents(self, refs: list[DocumentIn]) -> list[Callable]:
        """Check every document before queueing (paths allowed, uploads decodable); read them in the job."""
        readers = []
        for ref in refs:
            if ref.path is not None:
                if ref.content is not None or ref.content_base64 is not None:
                    raise RequestError(400, "a document is a path or content, not both")
                path, name = self.settings.path(ref.path, "document path"), ref.name or ref.path
                readers.append(lambda on_page, path=path, name=name: named_document(path, name, on_page))
            else:
                data = upload_bytes(ref)
                readers.append(lambda on_page, data=data, name=ref.name or "<stdin>": uploaded_document(name, data))
        return readers

    # job bodies: run on the model worker, one at a time

    def ask(self, request: AskIn, readers: list[Callable], job: Job) -> None:
        docs, read_s = read_all(readers, job)
        answer = self.engine.ask(
            docs, request.question, request.method_options().make(), request.decoding(), request.truncate, job.text,
            job.progress, request.ignore_memory,
        )  # fmt: skip
        answer.stats.read_s = read_s
        job.emit({"event": "answer", "answer": answer.to_dict()})

    def build(self, request: BuildIn, output: Path, readers: list[Callable], job: Job) -> None:
        plan = request.build_options().resolve()
        check_target(output, request.force)
        docs, read_s = read_all(readers, job)
        built = self.engine.build_file(docs, output, plan, request.force, job.progress)  # atomic
        built.saved.stats.read_s = read_s
        job.emit({"event": "result", "result": built.to_dict()})

    def query(self, request: QueryIn, path: Path, job: Job) -> None:
        decoding = request.decoding()
        reselect = None if request.budget is None else Budget.parse(request.budget)
        saved = self.caches.get(path, self.engine)
        for question in request.questions:
            answer = self.engine.query(saved, question, reselect, decoding, job.text)
            job.emit({"event": "answer", "answer": answer.to_dict()})

    def info(self, path: Path, job: Job) -> None:
        job.emit({"event": "result", "result": describe_cache(path)})

    def health(self) -> dict:
        loaded = self.engine.loaded
        return {
            "status": "ok",
            "fastkv_version": __version__,
            "model": {
                "name": loaded.name,
                "spec": loaded.spec,
                "device": loaded.device.type,
                "dtype": dtype_name(loaded.dtype),
            },
            "queue": self.worker.status(),
            "caches": self.caches.summary(),
            "allow_dirs": [str(path) for path in self.settings.allow_dirs],
        }


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def same_model(requested: str, spec: str | None, name: str) -> bool:
    if requested in (spec, name):
        return True
    return spec is not None and Path(requested).expanduser().resolve() == Path(spec).expanduser().resolve()


def upload_bytes(ref: DocumentIn) -> bytes:
    if (ref.content is None) == (ref.content_base64 is None):
        raise RequestError(400, "a document needs one of path, content or content_base64")
    if ref.content is not None:
        return ref.content.encode("utf-8", errors="surrogatepass")
    try:
        return base64.b64decode(ref.content_base64, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{ref.name or '<stdin>'}: content_base64 is not valid base64") from None


def read_all(readers: list[Callable], job: Job) -> tuple[list, float]:
    start = time.perf_counter()
    docs = [read(lambda done, total: job.progress("reading PDF pages", done, total)) for read in readers]
    return docs, time.perf_counter() - start


# --- HTTP ---------------------------------------------------------------------------------------------


def error_response(event: dict) -> JSONResponse:
    return JSONResponse({"error": event["error"]}, status_code=event["status"])


def request_error(status: int, message: str, exit_code: int = 2) -> JSONResponse:
    return error_response(error_event(RequestError(status, message, exit_code)))


async def first_event(request: Request, job: Job) -> dict | None:
    """Wait for the job's first event (it may wait in the queue first); None if the client left
    meanwhile, which cancels the job."""
    getter = asyncio.ensure_future(job.events.get())
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
            if done:
                return getter.result()
            if await request.is_disconnected():
                return None
    finally:
        if not getter.done():
            getter.cancel()
            job.cancel()


async def run_job(service: Service, request: Request, work: Callable[[Job], None]) -> tuple[Job, dict | None]:
    job = Job(work, asyncio.get_running_loop())
    service.worker.submit(job)
    return job, await first_event(request, job)


async def events_after(job: Job, first: dict) -> AsyncIterator[dict]:
    """The job's events from `first` on; leaving early (the client left) cancels the job."""
    try:
        event = first
        while event is not END:
            yield event
            event = await job.events.get()
    finally:
        job.cancel()


async def streamed(service: Service, request: Request, work: Callable[[Job], None]) -> Response:
    """Run `work` on the model worker and stream its events as JSON lines; an error before any output
    is an HTTP error with a JSON body instead."""
    job, first = await run_job(service, request, work)
    if first is None:
        return Response(status_code=CLIENT_LEFT)
    if first["event"] == "error":
        return error_response(first)

    async def lines():
        async for event in events_after(job, first):
            yield json.dumps(event, ensure_ascii=False) + "\n"

    return StreamingResponse(lines(), media_type=NDJSON)


async def collected(service: Service, request: Request, work: Callable[[Job], None]) -> Response:
    """Run `work` and answer with its one result as JSON (errors: HTTP error with a JSON body)."""
    job, first = await run_job(service, request, work)
    if first is None:
        return Response(status_code=CLIENT_LEFT)
    result = None
    async for event in events_after(job, first):
        if event["event"] == "error":
            return error_response(event)
        if event["event"] == "result":
            result = event["result"]
    return JSONResponse(result)


class BodyLimit:
    """ASGI middleware: a request body over the limit gets 413 before it is read whole into memory. Every
    body is read as JSON whatever its Content-Type says (`curl -d` sends a form type)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        mib = self.limit / (1 << 20)
        message = f"the request body is larger than this server's limit of {mib:g} MiB (--max-upload-mb)"
        headers = [(key, value) for key, value in scope["headers"] if key != b"content-type"]
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        declared = dict(headers).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await request_error(413, message)(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            event = await receive()
            received += len(event.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, message)
            return event

        await self.app(scope, limited, send)


def create_app(service: Service) -> FastAPI:
    """The HTTP API over `service`; every route needs the bearer token when the server has one."""
    settings = service.settings

    async def authorized(request: Request) -> None:
        if not settings.token_ok(request.headers.get("authorization")):
            raise RequestError(401, "this server needs a bearer token: set FASTKV_TOKEN (Authorization: Bearer ...)")

    app = FastAPI(
        title="fastkv", version=__version__, dependencies=[Depends(authorized)], docs_url=None, redoc_url=None
    )
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError):
        response = error_response(error_event(error))
        if error.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(InputError)
    async def bad_input(request: Request, error: InputError):
        return error_response(error_event(error))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return request_error(400, validation_message(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return request_error(error.status_code, str(error.detail), 2 if error.status_code < 500 else 1)

    @app.get("/health")
    async def health():
        return service.health()

    @app.post("/ask")
    async def ask(body: AskIn, request: Request):
        service.check_model(body)
        readers = service.documents(body.documents)
        return await streamed(service, request, lambda job: service.ask(body, readers, job))

    @app.post("/cache/build")
    async def cache_build(body: BuildIn, request: Request):
        service.check_model(body)
        output = settings.path(body.output, "cache path")
        readers = service.documents(body.documents)
        return await streamed(service, request, lambda job: service.build(body, output, readers, job))

    @app.post("/cache/query")
    async def cache_query(body: QueryIn, request: Request):
        service.check_model(body)
        path = settings.path(body.cache, "cache path")
        return await streamed(service, request, lambda job: service.query(body, path, job))

    @app.post("/cache/info")
    async def cache_info(body: InfoIn, request: Request):
        path = settings.path(body.cache, "cache path")
        return await collected(service, request, lambda job: service.info(path, job))

    from fastkv_cli.openai_chat import add_routes

    add_routes(app, service)
    return app


def validation_message(error: RequestValidationError) -> str:
    """One line from pydantic's first complaint: where, then what."""
    first: dict[str, Any] = error.errors()[0] if error.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    return f"{where or 'request'}: {first.get('msg', 'invalid request')}"


class Server(uvicorn.Server):
    """uvicorn's server, stopping the model's work on Ctrl-C / SIGTERM: the running job is cancelled at
    its next layer or token (a cache file being saved is finished: writes are atomic), queued jobs are
    refused, and the process then exits 0 instead of re-raising the signal."""

    def __init__(self, config: uvicorn.Config, worker: Worker, announce: Callable[[str], None]):
        super().__init__(config)
        self.worker, self.announce = worker, announce

    def handle_exit(self, sig, frame) -> None:
        self.worker.stop()
        super().handle_exit(sig, frame)
        getattr(self, "_captured_signals", []).clear()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.announce(f"http://{f'[{host}]' if ':' in host else host}:{port}")


def listening_socket(host: str, port: int) -> socket.socket:
    """Bound here rather than in uvicorn, so that a port in use is one line and exit 1, not uvicorn's log."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        raise FastKVError(f"cannot listen on {host}:{port} ({error.strerror or error})") from None
    return sock


def serve_forever(engine: Engine, settings: Settings, sock: socket.socket, announce: Callable[[str], None]) -> None:
    """Serve on `sock` until Ctrl-C or SIGTERM; returns once the model worker has stopped."""
    service = Service(engine, settings)
    config = uvicorn.Config(create_app(service), log_level="warning", access_log=False, lifespan="off")
    try:
        Server(config, service.worker, announce).run(sockets=[sock])
    finally:
        service.worker.close()
        sock.close()
