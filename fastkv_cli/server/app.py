"""The HTTP application over one Service (body limit, errors as JSON, bearer token, fastkv's and OpenAI's
routes) and the uvicorn server that runs it until Ctrl-C or SIGTERM."""

import socket
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from core import __version__
from core.engine import Engine
from core.errors import FastKVError, InputError
from fastkv_cli.server.jobs import ModelQueue, RequestError, error_event
from fastkv_cli.server.openai_chat import openai_routes
from fastkv_cli.server.routes import fastkv_routes
from fastkv_cli.server.service import Service
from fastkv_cli.server.settings import Settings
from fastkv_cli.server.streaming import error_response, request_error

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


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

    app.include_router(fastkv_routes(service))
    app.include_router(openai_routes(service))
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

    def __init__(self, config: uvicorn.Config, queue: ModelQueue, announce: Callable[[str], None]):
        super().__init__(config)
        self.queue, self.announce = queue, announce

    def handle_exit(self, sig, frame) -> None:
        self.queue.stop()
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
    """Serve on `sock` until Ctrl-C or SIGTERM; returns once the model thread has stopped."""
    service = Service(engine, settings)
    config = uvicorn.Config(create_app(service), log_level="warning", access_log=False, lifespan="off")
    try:
        Server(config, service.queue, announce).run(sockets=[sock])
    finally:
        service.queue.close()
        sock.close()
