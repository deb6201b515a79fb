"""The options of `ask` and `cache build` as the user gives them, and a build resolved once from them: what the
CLI, the server and corpus runs hand the engine."""

from dataclasses import dataclass, field

from core.errors import InputError
from core.methods import BUILD_METHOD, DEFAULT_METHOD, Budget, Method, make_method
from core.storage import QUERY_AWARE, QUESTION_BLIND, TWO_STAGE, check_cache_dtype, storage_for


@dataclass(frozen=True)
class MethodOptions:
    """--method and its parameters as given; None leaves a parameter at the method's default, and the method at
    the command's (`ask`'s DEFAULT_METHOD; `cache build`'s, BuildOptions.resolve)."""

    name: str | None = None
    budget: str | None = None
    tsp_layer: int | None = None
    tsp_rate: str | None = None
    pooling: str | None = None
    window: str | int | None = None
    filter_layer: int | None = None
    head_budget: str | None = None

    def make(self, default: str = DEFAULT_METHOD) -> Method:
        parameters = {key: value for key, value in vars(self).items() if key != "name"}
        return make_method(self.name or default, **parameters)


@dataclass(frozen=True)
class BuildOptions:
    """`cache build`'s options as given; `resolve` checks them together and fills in the defaults."""

    method: MethodOptions = field(default_factory=MethodOptions)
    query_budget: str | None = None
    questions: tuple[str, ...] = ()
    query_aware: bool | None = None  # None: query-aware wherever the method can pause (BuildPlan.of)
    cache_dtype: str | None = None  # None: the storage default of the kind (core.storage.storage_for)
    truncate: str | None = None
    ignore_memory: bool = False

    def resolve(self) -> "BuildPlan":
        """The plan, checked. Unsaid, the method is BUILD_METHOD (kvzip: selected once, for every question),
        or fastkv for a kind that selects by each question or steering questions (--query-aware, --query-budget,
        --questions)."""
        query_budget = None if self.query_budget is None else Budget.parse(self.query_budget, "--query-budget")
        by_question = self.query_aware or query_budget is not None or self.questions
        method = self.method.make(DEFAULT_METHOD if by_question else BUILD_METHOD)
        return BuildPlan.of(
            method, query_budget, self.questions, self.query_aware, self.cache_dtype, self.truncate,
            self.ignore_memory,
        )  # fmt: skip


@dataclass(frozen=True)
class BuildPlan:
    """A cache build, checked: the method as the file records it (a question-blind build's question window
    resolved to what it scores with), what each query re-selects to, the steering questions, whether the
    prefill pauses for each question to resume it, and the storage."""

    method: Method
    query_budget: Budget | None = None
    questions: tuple[str, ...] = ()
    query_aware: bool = False
    storage: str = "float16"
    truncate: str | None = None
    ignore_memory: bool = False

    def __post_init__(self):
        object.__setattr__(self, "questions", tuple(self.questions))
        if not self.query_aware:  # a query-aware cache keeps a question window for each question to resolve
            object.__setattr__(self, "method", self.method.for_question(None))
        if self.method.restarts:
            raise InputError(
                f"--method {self.method.name} re-prefills with new positions; a saved cache needs original positions"
            )
        if self.query_aware:
            check_query_aware(self.method, self.query_budget, self.questions)
        check_cache_dtype(self.storage, self.query_aware)

    @classmethod
    def of(
        cls,
        method: Method,
        query_budget: Budget | None = None,
        questions: tuple[str, ...] = (),
        query_aware: bool | None = None,
        storage: str | None = None,
        truncate: str | None = None,
        ignore_memory: bool = False,
    ) -> "BuildPlan":
        """The plan with its defaults filled in. Unsaid, a build is query-aware wherever it can be, since its
        answers are `ask`'s: question-blind for a method with no TSP layer, or when `query_budget` or
        `questions` select without each question. The storage defaults by kind (storage_for)."""
        if query_aware is None:
            query_aware = method.propagates and method.selects_by_question and query_budget is None and not questions
        storage = storage_for(storage, query_aware)
        return cls(method, query_budget, questions, query_aware, storage, truncate, ignore_memory)

    @property
    def kind(self) -> str:
        if self.query_aware:
            return QUERY_AWARE
        return QUESTION_BLIND if self.query_budget is None else TWO_STAGE


def check_query_aware(method: Method, query_budget: Budget | None, questions: tuple[str, ...]) -> None:
    """A query-aware build pauses where the method starts selecting by the question: fastkv's TSP layer."""
    if not method.propagates:
        raise InputError(f"--query-aware pauses at fastkv's TSP layer; --method {method.name} has none")
    if not method.selects_by_question:
        raise InputError(
            f"--query-aware leaves the selection to each question; --method {method.name} selects without one"
        )
    if questions or query_budget is not None:
        given = "--questions" if questions else "--query-budget"
        raise InputError(f"{given} does not apply to --query-aware: each question selects for itself")
