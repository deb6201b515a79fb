"""How each answer of the accuracy benchmark is produced (a variant: mode, method, budget, storage) and the plan
of variants a run asks for."""

from dataclasses import dataclass, replace

from core.generation import Decoding
from core.methods import DEFAULT_METHOD, METHODS, Budget, Method, make_method
from core.methods.fullkv import FullKV

MODES = ("ask", "question-blind", "two-stage", "query-aware", "every-token")
STORED_FACTOR = 3.0


@dataclass(frozen=True)
class Variant:
    """How one answer is produced: mode, method, final budget (None: fullkv) and, for a saved mode, the
    storage dtype its cache goes through (None: queried in memory as built)."""

    mode: str
    method: str
    budget: Budget | None = None
    dtype: str | None = None

    @property
    def budget_label(self) -> str:
        return "—" if self.budget is None else str(self.budget)

    @property
    def dtype_label(self) -> str:
        return "—" if self.dtype is None else self.dtype

    @property
    def asked(self) -> "Variant | None":
        """The ask variant a saved one is compared with: same method and budget (every-token: `ask`'s
        default method at the budget); None for an ask variant."""
        if self.mode == "ask":
            return None
        return Variant("ask", DEFAULT_METHOD if self.mode == "every-token" else self.method, self.budget)

    @property
    def build(self) -> "Variant":
        """The build this variant's cache comes from, whatever dtype it is stored in."""
        return replace(self, dtype=None)


REFERENCE = Variant("ask", "fullkv")  # every answer's fidelity is measured against it


@dataclass(frozen=True)
class Settings:
    variants: list[Variant]
    decoding: Decoding
    stored_factor: float


def stored_budget(budget: Budget, factor: float) -> Budget:
    """What a two-stage cache stores for a final `budget`: factor x budget, at most the whole context."""
    if budget.proportional:
        return Budget(min(1.0, budget.value * factor), proportional=True)
    return Budget(int(budget.value * factor), proportional=False)


def variant_methods(variant: Variant, factor: float) -> tuple[Method, Budget | None]:
    """The method to prefill or build with, and the budget a saved cache's query re-selects to."""
    if variant.budget is None:
        return FullKV(), None
    if variant.mode == "every-token":
        return FullKV(), variant.budget
    if variant.mode == "two-stage":
        return make_method(variant.method, budget=stored_budget(variant.budget, factor)), variant.budget
    return make_method(variant.method, budget=variant.budget), None


def plan(
    methods: list[str], budgets: list[Budget], modes: list[str], dtypes: list[str | None] = (None,)
) -> list[Variant]:
    """fullkv ask first (always: it is the reference), then every method, budget and mode asked for, each
    saved mode in every storage dtype. every-token builds fullkv's cache whatever --methods says."""
    variants = [REFERENCE]
    for mode in modes:
        usable = [m for m in methods if m != "fullkv" and not (mode != "ask" and METHODS[m].restarts)]
        usable = [m for m in usable if mode != "query-aware" or METHODS[m].selects_by_question]
        usable = [m for m in usable if mode != "query-aware" or METHODS[m].propagates]  # it pauses at TSP
        usable = ["fullkv"] if mode == "every-token" else usable
        stored = [None] if mode == "ask" else dtypes
        variants += [Variant(mode, m, budget, dtype) for m in usable for budget in budgets for dtype in stored]
    return variants
