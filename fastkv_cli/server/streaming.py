"""How a route runs its work on the model queue and answers: JSON-lines events as they come, one collected
result, or a JSON error; a client that leaves cancels its job."""

import asyncio
import json
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from fastkv_cli.server.jobs import END, Job, ModelQueue, RequestError, error_event

NDJSON = "application/x-ndjson"
DISCONNECT_POLL_S = 0.25  # how often a request waiting in the queue checks that its client is still there
CLIENT_LEFT = 499  # nginx's status for a request whose client closed the connection: nobody reads it


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


async def run_job(queue: ModelQueue, request: Request, work: Callable[[Job], None]) -> tuple[Job, dict | None]:
    job = Job(work, asyncio.get_running_loop())
    queue.submit(job)
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


async def streamed(queue: ModelQueue, request: Request, work: Callable[[Job], None]) -> Response:
    """Run `work` on the model queue and stream its events as JSON lines; an error before any output
    is an HTTP error with a JSON body instead."""
    job, first = await run_job(queue, request, work)
    if first is None:
        return Response(status_code=CLIENT_LEFT)
    if first["event"] == "error":
        return error_response(first)

    async def lines():
        async for event in events_after(job, first):
            yield json.dumps(event, ensure_ascii=False) + "\n"

    return StreamingResponse(lines(), media_type=NDJSON)


async def collected(queue: ModelQueue, request: Request, work: Callable[[Job], None]) -> Response:
    """Run `work` and answer with its one result as JSON (errors: HTTP error with a JSON body)."""
    job, first = await run_job(queue, request, work)
    if first is None:
        return Response(status_code=CLIENT_LEFT)
    result = None
    async for event in events_after(job, first):
        if event["event"] == "error":
            return error_response(event)
        if event["event"] == "result":
            result = event["result"]
    return JSONResponse(result)
