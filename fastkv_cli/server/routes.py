"""fastkv's own routes: /health, /ask and /cache/build|query|info, taking the CLI's options and answering in
its JSON schema."""

from fastapi import APIRouter, Request

from fastkv_cli.server.schemas import AskIn, BuildIn, InfoIn, QueryIn
from fastkv_cli.server.service import Service
from fastkv_cli.server.streaming import collected, streamed


def fastkv_routes(service: Service) -> APIRouter:
    router = APIRouter()
    settings = service.settings

    @router.get("/health")
    async def health():
        return service.health()

    @router.post("/ask")
    async def ask(body: AskIn, request: Request):
        service.check_model(body)
        readers = service.documents(body.documents)
        return await streamed(service.queue, request, lambda job: service.ask(body, readers, job))

    @router.post("/cache/build")
    async def cache_build(body: BuildIn, request: Request):
        service.check_model(body)
        output = settings.path(body.output, "cache path")
        readers = service.documents(body.documents)
        return await streamed(service.queue, request, lambda job: service.build(body, output, readers, job))

    @router.post("/cache/query")
    async def cache_query(body: QueryIn, request: Request):
        service.check_model(body)
        path = settings.path(body.cache, "cache path")
        return await streamed(service.queue, request, lambda job: service.query(body, path, job))

    @router.post("/cache/info")
    async def cache_info(body: InfoIn, request: Request):
        path = settings.path(body.cache, "cache path")
        return await collected(service.queue, request, lambda job: service.info(path, job))

    return router
