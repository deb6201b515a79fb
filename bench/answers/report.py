"""What the accuracy benchmark shows of a run: its tables, the plot of accuracy against budget, and the
docs/benchmarks.md section that gathers them with the target lines."""

from pathlib import Path

from common import Table, cell, link
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

from answers.checks import TARGET_BUDGET, fmt
from answers.outcomes import Outcome, accuracy, select, summarise, tasks_of
from answers.variants import REFERENCE, Settings, Variant
from core.engine import Engine
from core.methods import DEFAULT_METHOD

TARGETS_HEADING = f"Targets at budget {TARGET_BUDGET}:"
SAVED_HEADING = "Saved caches against `ask`, at each budget run:"


def results_table(engine: Engine, outcomes: list[Outcome], settings: Settings, minutes: float | None) -> Table:
    table = Table(
        title=f"Accuracy and fidelity per method, budget and mode ({engine.loaded.name}, {engine.loaded.dtype})",
        headers=[
            "task",
            "mode",
            "method",
            "budget",
            "storage",
            "n",
            "accuracy %",
            "F1 %",
            "same as ask %",
            "same as fullkv %",
            "KL",
            "prefill s",
        ],
        text_columns=5,
    )
    for task in tasks_of(outcomes):
        for variant in settings.variants:
            s = summarise(select(outcomes, task, variant))
            if s is not None:
                numbers = [cell(s.accuracy, 1), cell(s.f1, 1), cell(s.same_as_ask, 1), cell(s.same, 1),
                           f"{s.kl:.3g}", cell(s.prefill_s, 2)]  # fmt: skip
                labels = [task, variant.mode, variant.method, variant.budget_label, variant.dtype_label]
                table.rows.append([*labels, str(s.n), *numbers])
    table.caption = (
        "ask: the question ends the prompt (query-aware). question-blind: a saved cache built at the budget without the "
        f"question. two-stage: built at min(100%, {settings.stored_factor:g}× budget), each question re-selects down "
        "to the budget. query-aware: built paused at the TSP layer, each question resumes it as ask would. "
        "every-token: a fullkv cache, each question selects the budget from it (SnapKV with its own tokens). "
        "storage: the saved cache written and read back in that dtype (—: queried in memory as built). "
        "accuracy: passkey digits exact / docqa normalised answer span contained in the answer; F1: token F1 "
        "(docqa). same as ask: a saved mode's greedy answer identical to ask's at the same method and budget "
        f"(every-token: {DEFAULT_METHOD}'s). same as fullkv: greedy answer identical to fullkv's ask answer; KL: "
        "mean KL(fullkv ask ‖ "
        "method) of the first answer token (0 for snapkv and streamingllm in ask mode: they compress after an exact "
        "prefill, so only later tokens can differ). "
        f"Greedy, at most {settings.decoding.max_new_tokens} new tokens. prefill s: "
        "ask: context + question; saved modes: the document's build (once per document, shared by its questions; "
        "a query-aware query then runs the deeper layers on the tokens its question selects, bench/cache.py times it). "
        + (
            f"Whole run: {minutes:.0f} min."
            if minutes is not None
            else "Rendered from the per-item answers a run saved."
        )
    )
    return table


def passkey_table(outcomes: list[Outcome], settings: Settings) -> Table | None:
    """Passkey accuracy per prompt length, method and budget, in ask mode."""
    asked = [o for o in select(outcomes, "passkey") if o.variant.mode == "ask"]
    if not asked:
        return None
    budgets = list(dict.fromkeys(v.budget for v in settings.variants if v.budget is not None))
    methods = list(dict.fromkeys(v.method for v in settings.variants if v.mode == "ask"))
    table = Table(
        title="Passkey accuracy % by prompt length (ask mode)",
        headers=["tokens", "method", *map(str, budgets)],
        text_columns=2,
    )
    for length in sorted({o.item.length for o in asked}):
        for method in methods:
            per_budget = [None] * len(budgets) if method == "fullkv" else budgets
            values = [accuracy(asked, variant=Variant("ask", method, b), length=length) for b in per_budget]
            table.rows.append([str(length), method, *(cell(v, 0) for v in values)])
    table.caption = "fullkv keeps everything: its one accuracy is repeated under every budget. 5 depths per length."
    return table


def fullkv_line(outcomes: list[Outcome]) -> str:
    """fullkv's own accuracy: the model's ceiling, which the compressed methods are measured against."""
    scores = ", ".join(f"{task} {fmt(accuracy(outcomes, task, REFERENCE))}%" for task in tasks_of(outcomes))
    return f"Full KV (no compression) scores {scores}: the model's own limit; read each method against it, not 100%."


def plot(outcomes: list[Outcome], settings: Settings, title: str, path: Path) -> None:
    """Accuracy against budget: one panel per task, a colour per method, a line style per mode."""
    tasks = tasks_of(outcomes)
    budgets = list(dict.fromkeys(v.budget for v in settings.variants if v.budget is not None))
    methods = list(dict.fromkeys(v.method for v in settings.variants if v.budget is not None))
    styles = {"ask": "-o", "query-aware": "-.D", "two-stage": "--s", "question-blind": ":^", "every-token": "-.x"}
    lines = list(dict.fromkeys((v.mode, v.dtype) for v in settings.variants))
    fig = Figure(figsize=(6 * len(tasks), 4.5))
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=True):
        ax.axhline(accuracy(outcomes, task, REFERENCE), color="black", linestyle="--", label="fullkv (ask)")
        for color, method in enumerate(methods):
            for mode, dtype in lines:
                values = [accuracy(outcomes, task, Variant(mode, method, b, dtype)) for b in budgets]
                label = f"{method} ({mode}{'' if dtype is None else ', ' + dtype})"
                if None not in values:
                    ax.plot(range(len(budgets)), values, styles[mode], color=f"C{color}", label=label)
        ax.set(title=task, xlabel="KV budget", ylabel="accuracy %", ylim=(-3, 103))
        ax.set_xticks(range(len(budgets)), [str(b) for b in budgets])
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1, 0.5))
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def section_body(
    tables: list[Table], outcomes: list[Outcome], verdicts: list[str], saved: list[str], plot_path: Path
) -> str:
    targets = [TARGETS_HEADING, "", *[f"- {line}" for line in verdicts], ""] if verdicts else []
    targets += [SAVED_HEADING, "", *[f"- {line}" for line in saved], ""] if saved else []
    plot_link = f"![Accuracy against KV budget per method and mode]({link(plot_path)})"
    return "\n".join([*(t.markdown() for t in tables), fullkv_line(outcomes), "", *targets, plot_link, ""])
