"""OpenAI-compatible `POST /v1/chat/completions` and `GET /v1/models` over `fastkv serve`.

The last user message is the question. The documents are the earlier user and assistant messages, the
text parts before the question in the last message, and `file` content parts (`file_data`, base64),
plus files on the server named in the `fastkv` extension (`{"fastkv": {"documents": [PATH, ...]}}`,
restricted by --allow-dir); `{"fastkv": {"cache": "FILE.fkv"}}` answers from a saved cache instead.
System messages are ignored (fastkv's prompt has its own). Sampling defaults to greedy, as the CLI.
"""

import base64
import binascii
import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fastkv_cli.server.jobs import RequestError
from fastkv_cli.server.schemas import AskIn, DocumentIn, QueryIn
from fastkv_cli.server.service import Service
from fastkv_cli.server.streaming import CLIENT_LEFT, error_response, events_after, run_job

DOCUMENT_ROLES = ("user", "assistant")


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None


class FastkvOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    documents: list[str] = []
    cache: str | None = None
    method: str | None = None
    budget: str | None = None
    tsp_layer: int | None = None
    tsp_rate: str | None = None
    truncate: str | None = None


class ChatIn(BaseModel):
    """OpenAI's fields fastkv uses; others (n, stop, penalties, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = None
    fastkv: FastkvOptions = FastkvOptions()


def parts(message: Message) -> list[dict]:
    if message.content is None:
        return []
    if isinstance(message.content, str):
        return [{"type": "text", "text": message.content}]
    return message.content


def part_document(part: dict, name: str) -> DocumentIn:
    kind = part.get("type")
    if kind == "text" and isinstance(part.get("text"), str):
        return DocumentIn(name=name, content=part["text"])
    if kind == "file" and isinstance(part.get("file"), dict) and isinstance(part["file"].get("file_data"), str):
        data = part["file"]["file_data"]
        data = data.split(",", 1)[1] if data.startswith("data:") else data  # a data URL or plain base64
        try:
            base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, f"{name}: file_data is not base64") from None
        return DocumentIn(name=part["file"].get("filename") or name, content_base64=data)
    raise RequestError(400, f"{name}: content parts of type {kind!r} are not supported (text and file are)")


def question_and_documents(chat: ChatIn) -> tuple[str, list[DocumentIn]]:
    last = chat.messages[-1]
    if last.role != "user":
        raise RequestError(400, "messages: the last message must be the user's question")
    last_parts = parts(last)
    texts = [i for i, part in enumerate(last_parts) if part.get("type") == "text"]
    if not texts:
        raise RequestError(400, "messages: the last user message has no text to use as the question")
    question = last_parts[texts[-1]]["text"]
    documents = [DocumentIn(path=path, name=path) for path in chat.fastkv.documents]
    for number, message in enumerate(chat.messages[:-1], 1):
        if message.role in DOCUMENT_ROLES:
            documents += [part_document(part, f"message {number}") for part in parts(message)]
    documents += [part_document(part, f"message {len(chat.messages)}") for part in last_parts[: texts[-1]]]
    documents += [part_document(part, f"message {len(chat.messages)}") for part in last_parts[texts[-1] + 1 :]]
    return question, documents


def decoding_fields(chat: ChatIn) -> dict:
    fields = {"max_new_tokens": chat.max_completion_tokens or chat.max_tokens or 256, "seed": chat.seed}
    if chat.temperature is not None:
        fields["temperature"] = chat.temperature
    if chat.top_p is not None:
        fields["top_p"] = chat.top_p
    return fields


def chunk(ident: str, created: int, model: str, delta: dict, finish: str | None = None) -> str:
    body = {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def finish_reason(answer: dict, max_new_tokens: int) -> str:
    return "length" if answer["stats"]["new_tokens"] >= max_new_tokens else "stop"


def usage(answer: dict) -> dict:
    prompt, completion = answer["stats"]["context_tokens"], answer["stats"]["new_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def openai_routes(service: Service) -> APIRouter:
    router = APIRouter()

    def work_for(chat: ChatIn):
        try:
            return fastkv_request(chat)
        except ValidationError as error:
            first = error.errors()[0]
            raise RequestError(400, f"{'.'.join(map(str, first['loc'])) or 'request'}: {first['msg']}") from None

    def fastkv_request(chat: ChatIn):
        question, documents = question_and_documents(chat)
        options = chat.fastkv
        if options.cache is not None:
            if documents:
                raise RequestError(400, "fastkv.cache answers from a saved cache: send no documents with it")
            request = QueryIn(cache=options.cache, questions=[question], budget=options.budget, **decoding_fields(chat))
            path = service.settings.path(request.cache, "cache path")
            return request, lambda job: service.query(request, path, job)
        if not documents:
            raise RequestError(400, "no documents: send them as earlier messages, file parts or fastkv.documents")
        method = {key: value for key, value in options.model_dump().items() if key not in ("documents", "cache")}
        method = {key: value for key, value in method.items() if value is not None}
        request = AskIn(documents=documents, question=question, **method, **decoding_fields(chat))
        readers = service.documents(request.documents)
        return request, lambda job: service.ask(request, readers, job)

    @router.get("/v1/models")
    async def models():
        name = service.engine.loaded.name
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "fastkv"}]}

    @router.post("/v1/chat/completions")
    async def chat_completions(chat: ChatIn, request: Request):
        fields, work = work_for(chat)
        job, first = await run_job(service.queue, request, work)
        if first is None:
            return Response(status_code=CLIENT_LEFT)
        if first["event"] == "error":
            return error_response(first)
        ident, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), service.engine.loaded.name
        if chat.stream:

            async def sse():
                yield chunk(ident, created, model, {"role": "assistant", "content": ""})
                async for event in events_after(job, first):
                    if event["event"] == "text":
                        yield chunk(ident, created, model, {"content": event["text"]})
                    elif event["event"] == "answer":
                        yield chunk(ident, created, model, {}, finish_reason(event["answer"], fields.max_new_tokens))
                    elif event["event"] == "error":
                        yield f"data: {json.dumps({'error': event['error']}, ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")
        answer = None
        async for event in events_after(job, first):
            if event["event"] == "error":
                return error_response(event)
            if event["event"] == "answer":
                answer = event["answer"]
        return JSONResponse({
            "id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{
                "index": 0, "message": {"role": "assistant", "content": answer["answer"]},
                "finish_reason": finish_reason(answer, fields.max_new_tokens),
            }],
            "usage": usage(answer),
            "fastkv": answer,
        })  # fmt: skip

    return router
