"""The JSON bodies of fastkv's routes: the CLI's options by the same names, unknown fields refused."""

from pydantic import BaseModel, ConfigDict, Field

from core.generation import Decoding, Sampling
from core.options import BuildOptions, MethodOptions


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
    method: str | None = None  # None: the command's default, as the CLI's
    budget: str | None = None
    tsp_layer: int | None = None
    tsp_rate: str | None = None
    pooling: str | None = None
    window: int | None = None
    head_budget: str | None = None

    def method_options(self) -> MethodOptions:
        fields = ("budget", "tsp_layer", "tsp_rate", "pooling", "window", "head_budget", "filter_layer")
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
    cache_dtype: str | None = None  # None: the CLI's default (core.storage.storage_for)
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
