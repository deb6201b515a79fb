"""The loaded engine with what serves it (settings, the model queue, the cache LRU) and the job bodies that
run on the model thread: ask, cache build, query and info."""

from collections.abc import Callable
from pathlib import Path

from core import __version__
from core.engine import Engine
from core.methods import Budget
from core.storage import check_target, describe_cache
from fastkv_cli.server.caches import CacheLRU
from fastkv_cli.server.documents import named_document, read_all, upload_bytes, uploaded_document
from fastkv_cli.server.jobs import Job, ModelQueue, RequestError
from fastkv_cli.server.schemas import AskIn, BuildIn, DocumentIn, ModelChoice, QueryIn
from fastkv_cli.server.settings import Settings


class Service:
    """The loaded engine with what serves it: settings, the model queue, the cache LRU."""

    def __init__(self, engine: Engine, settings: Settings):
        self.engine = engine
        engine.model_load.claim()  # loaded before serving: no request waits for it, so no answer reports it
        self.settings = settings
        self.queue = ModelQueue(settings.queue_size)
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

    # job bodies: run on the model thread, one at a time

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
            "queue": self.queue.status(),
            "caches": self.caches.summary(),
            "allow_dirs": [str(path) for path in self.settings.allow_dirs],
        }


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def same_model(requested: str, spec: str | None, name: str) -> bool:
    if requested in (spec, name):
        return True
    return spec is not None and Path(requested).expanduser().resolve() == Path(spec).expanduser().resolve()
