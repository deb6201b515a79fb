"""The manifest of a .fkv file as typed data: one parse and check of its JSON (`Manifest.from_dict`), one
serialisation (`Manifest.to_dict`). docs/cache-format.md lists the fields."""

from dataclasses import asdict, dataclass, fields, replace
from typing import ClassVar

from core.errors import CacheFileError, FastKVError
from core.methods import METHODS, Method, make_method
from core.storage.fields import NONE, Fields
from core.storage.scheme import STORAGE_DTYPES, Quantization, parse_quantization

FORMAT_VERSION = 13
REBUILD = "rebuild it with `fastkv cache build`"
POLICY_COUNTS = ("budget_tokens", "propagated_tokens", "tsp_layer")
QUERY_AWARE, TWO_STAGE, QUESTION_BLIND = "query-aware", "two-stage", "question-blind"  # the kinds of saved cache


@dataclass(frozen=True)
class ModelFingerprint:
    """The model a cache was built with: its name and `--model` spec, and what a model must match to use it."""

    name: str
    spec: str | None  # None: the embedded default
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    weights_sha256: str

    SIZES: ClassVar = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "vocab_size")

    @classmethod
    def parse(cls, model: Fields) -> "ModelFingerprint":
        sizes = {key: model.get(key, int) for key in cls.SIZES}
        for key, size in sizes.items():
            if size < 1:
                raise CacheFileError(f"manifest.model.{key} should be at least 1, not {size}")
        strings = {key: model.get(key, str) for key in ("name", "model_type", "weights_sha256")}
        return cls(spec=model.get("spec", str, NONE), **strings, **sizes)


@dataclass(frozen=True)
class MethodRecord:
    """The token-selection method a cache was built with and its settings (budgets in their CLI spelling)."""

    name: str
    parameters: dict

    def make(self) -> Method:
        return make_method(self.name, **self.parameters)

    @property
    def reconstructs(self) -> bool:
        """Whether the method scores by the model repeating the context (kvzip): known from its name alone, so that
        describing a file never depends on parameters only a query checks."""
        method = METHODS.get(self.name)
        return method is not None and method.reconstructs


@dataclass(frozen=True)
class Template:
    """The chat-template text around a question: a query appends `question_prefix + question + tail`."""

    question_prefix: str
    tail: str


@dataclass(frozen=True)
class DocumentRecord:
    """One source document: the path as given, sha256 of its bytes, pages, tokens in the prompt, byte size, and
    each page's [start, end) token span in the prompt."""

    name: str
    sha256: str
    pages: int
    tokens: int
    size: int
    page_token_spans: tuple[tuple[int, int], ...]

    @property
    def pages_used(self) -> int:
        """Pages with some tokens in the prompt."""
        return sum(end > start for start, end in self.page_token_spans)

    @classmethod
    def parse(cls, document: Fields, context_tokens: int) -> "DocumentRecord":
        where = document.where
        strings = {key: document.get(key, str) for key in ("name", "sha256")}
        counts = {key: document.get(key, int) for key in ("size", "pages", "tokens")}
        spans = document.get("page_token_spans", list)
        if min(counts.values()) < 0:
            raise CacheFileError(f"{where} has a negative size, page or token count")
        if len(spans) != counts["pages"]:
            raise CacheFileError(f"{where}.page_token_spans should have one span per page")
        for span in spans:
            if not (
                isinstance(span, list)
                and len(span) == 2
                and all(type(end) is int for end in span)
                and 0 <= span[0] <= span[1] <= context_tokens
            ):
                raise CacheFileError(f"{where}.page_token_spans holds {str(span)[:40]}, not a [start, end) span")
        return cls(**strings, **counts, page_token_spans=tuple((start, end) for start, end in spans))

    def summary(self) -> dict:
        """What an answer's `documents` entry says of it (the `--json` schema)."""
        return {
            "name": self.name,
            "sha256": self.sha256,
            "pages": self.pages,
            "tokens": self.tokens,
            "pages_used": self.pages_used,
        }

    def to_dict(self) -> dict:
        return {**self.summary(), "size": self.size, "page_token_spans": [list(span) for span in self.page_token_spans]}


@dataclass(frozen=True)
class Storage:
    """How a saved file stores its tensors: a --cache-dtype, its quantization scheme (None: float storage) and the
    checksum of the tensors as stored."""

    dtype: str
    quantization: Quantization | None
    tensors_sha256: str


@dataclass(frozen=True)
class Manifest:
    """What a saved cache was built from and with; `storage` is None until the cache is saved (save_cache)."""

    fastkv_version: str
    created: str  # ISO 8601, UTC
    model: ModelFingerprint
    tokenizer_sha256: str
    method: MethodRecord
    query_budget: str | None  # what each query re-selects the stored tokens down to (two-stage)
    steering_questions: int
    paused_layer: int | None  # where a query-aware cache's prefill paused
    policy: dict | None  # the method's settings in tokens for this context
    context_tokens: int
    dropped_tokens: int
    template: Template
    documents: tuple[DocumentRecord, ...]
    storage: Storage | None = None

    @property
    def kind(self) -> str:
        """query-aware (a paused prefill each question resumes), two-stage (each question re-selects the stored
        tokens) or question-blind (answers use the tokens selected without the question)."""
        if self.paused_layer is not None:
            return QUERY_AWARE
        return QUESTION_BLIND if self.query_budget is None else TWO_STAGE

    def to_dict(self) -> dict:
        """The JSON object a file stores (docs/cache-format.md), the storage's fields last."""
        data = {field.name: getattr(self, field.name) for field in fields(self) if field.name != "storage"}
        data |= {"model": asdict(self.model), "method": asdict(self.method), "template": asdict(self.template)}
        data |= {"policy": None if self.policy is None else dict(self.policy)}
        data["documents"] = [document.to_dict() for document in self.documents]
        if self.storage is None:
            return data
        quantization = self.storage.quantization
        return data | {
            "format_version": FORMAT_VERSION,
            "dtype": self.storage.dtype,
            "quantization": None if quantization is None else quantization.to_dict(),
            "tensors_sha256": self.storage.tensors_sha256,
        }

    @classmethod
    def from_dict(cls, data) -> "Manifest":
        """The manifest a file's JSON holds, every field checked; CacheFileError naming the first that is wrong.
        A file of another format version is refused before anything else is read."""
        version = data.get("format_version") if isinstance(data, dict) else None
        if type(version) is not int or version != FORMAT_VERSION:
            raise CacheFileError(
                f"cache format version {version!r}; this fastkv reads only version {FORMAT_VERSION}: {REBUILD}"
            )
        manifest = Fields(data, "manifest")
        context_tokens = manifest.get("context_tokens", int)
        if not 1 <= context_tokens < 2**31:  # positions are int32
            raise CacheFileError(f"manifest.context_tokens should be 1 to 2**31 - 1, not {str(context_tokens)[:40]}")
        counts = {key: manifest.get(key, int) for key in ("steering_questions", "dropped_tokens")}
        for key, count in counts.items():
            if count < 0:
                raise CacheFileError(f"manifest.{key} should not be negative, not {count}")
        method, template = manifest.object("method"), manifest.object("template")
        parsed = cls(
            **{key: manifest.get(key, str) for key in ("fastkv_version", "created", "tokenizer_sha256")},
            model=ModelFingerprint.parse(manifest.object("model")),
            method=MethodRecord(method.get("name", str), method.get("parameters", dict)),
            query_budget=manifest.get("query_budget", str, NONE),
            paused_layer=manifest.get("paused_layer", int, NONE),
            policy=parse_policy(manifest.get("policy", dict, NONE)),
            context_tokens=context_tokens,
            template=Template(template.get("question_prefix", str), template.get("tail", str)),
            documents=tuple(DocumentRecord.parse(doc, context_tokens) for doc in manifest.objects("documents")),
            **counts,
        )
        if parsed.paused_layer is not None:
            check_resumable(parsed)
        return replace(parsed, storage=parse_storage(manifest, parsed))


def parse_policy(policy: dict | None) -> dict | None:
    """The resolved policy: its counts whole numbers, its window a number of tokens or null (the question's)."""
    for key, value in (policy or {}).items():
        count = type(value) is int and value >= 0
        if key in POLICY_COUNTS and not count or key == "window" and not (value is None or count and value >= 1):
            raise CacheFileError(f"manifest.policy.{key} should be a token count, not {str(value)[:40]!r}")
    return policy


def check_resumable(manifest: Manifest) -> None:
    """A query-aware cache names a method that pauses at `paused_layer`, with settings it accepts."""
    method, layer = manifest.method, manifest.paused_layer
    if "budget" not in method.parameters:  # each query resumes at this budget unless told another
        raise CacheFileError("manifest.method.parameters.budget is missing from a query-aware cache")
    try:
        pauses_at = method.make().pause_layer(manifest.model.num_layers)
    except (FastKVError, TypeError, ValueError):
        pauses_at = None
    if pauses_at != layer:
        raise CacheFileError(
            f"manifest.paused_layer {layer} is not where --method {method.name!r} with its parameters resumes"
        )


def parse_storage(manifest: Fields, parsed: Manifest) -> Storage:
    dtype = manifest.get("dtype", str)
    if dtype not in STORAGE_DTYPES:
        raise CacheFileError(f"unknown tensor dtype {dtype!r} in the manifest")
    quantization = parse_quantization(manifest, dtype, parsed.model, parsed.paused_layer is not None)
    return Storage(dtype, quantization, manifest.get("tensors_sha256", str))
