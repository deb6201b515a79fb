"""Options shared by several commands: reusable Annotated aliases, and groups of them passed as one value."""

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import typer

from fastkv_cli.help import LOCAL_RAY

Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Local HF folder, hub id, or .gguf file [default: $FASTKV_MODEL, else embedded SmolLM2-135M].",
    ),
]
Device = Annotated[str | None, typer.Option(help="cpu or cuda [default: cuda if available].")]
Dtype = Annotated[
    str | None, typer.Option(help="float32, bfloat16 or float16 [default: float32 on CPU, bfloat16 on CUDA].")
]
MaxNewTokens = Annotated[int, typer.Option(min=1, help="Stop the answer after this many tokens.")]
Temperature = Annotated[float, typer.Option(min=0.0, help="0 decodes greedily; above 0 samples.")]
TopP = Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling threshold (with --temperature > 0).")]
Seed = Annotated[int | None, typer.Option(help="Seed for sampling, for repeatable answers.")]
Truncate = Annotated[
    str | None,
    typer.Option(help="'middle': drop tokens from the middle of the documents when they overflow the window."),
]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object per answer on stdout, nothing else there.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or stats on stderr.")]
MethodName = Annotated[
    str | None,
    typer.Option(
        "--method",
        help="fastkv, fullkv, snapkv, adakv, streamingllm, gemfilter or kvzip (saved caches) [default: fastkv for "
        "ask; kvzip for cache build, fastkv with --query-aware, --query-budget or --questions].",
        show_default=False,
    ),
]
Budget = Annotated[
    str | None,
    typer.Option(
        help="Tokens cached per layer: a share of the context (10%), a count (1024), or a share with a floor "
        "(30%,2048: whichever is more) [default: 30%,2048 for fastkv, 60% for kvzip, 10% otherwise]."
    ),
]
TspLayer = Annotated[
    int | None,
    typer.Option(help="fastkv, kvzip: the layer after which only selected tokens propagate [default: middle]."),
]
TspRate = Annotated[
    str | None,
    typer.Option(
        help="fastkv, kvzip: tokens propagated past --tsp-layer, share (20%) or count [default: 20% for fastkv, "
        "none for kvzip (no TSP); a larger --budget propagates the budget]."
    ),
]
Pooling = Annotated[str | None, typer.Option(help="fastkv/snapkv/adakv: avgpool or maxpool over the window scores.")]
Window = Annotated[
    str | None,
    typer.Option(
        help="fastkv/snapkv/adakv: how many last queries score the tokens, or 'question': every token of the question "
        "and the chat template after it [default: question; 8 for a cache built without one]."
    ),
]
HeadBudget = Annotated[
    str | None,
    typer.Option(
        help="kvzip: global (one budget over the whole cache), adaptive (a layer's budget shared by its heads by "
        "score) or uniform (every layer and KV head keeps the budget) [default: global]."
    ),
]
FilterLayer = Annotated[
    int | None, typer.Option(help="gemfilter: the layer whose last query picks tokens [default: middle].")
]
CacheDtype = Annotated[
    str | None,
    typer.Option(
        help="How the file stores the cache. coded (query-aware caches only): each tensor rounded to one step "
        "with int6's rounding error, then entropy-coded; int8 / int6 / int4: group-wise quantized; float16, "
        "bfloat16, float32: unquantized (float32: answers bit for bit as `ask`). Measured share of the same "
        "cache in float16: coded 33%, int8 53-54%, int6 41-42%, int4 29-32%; a default query-aware file is 17-20% "
        "of a float16 fullkv cache. [default: coded; int6 for a question-blind cache]",
        show_default=False,
    ),
]
IgnoreMemory = Annotated[
    bool,
    typer.Option("--ignore-memory", help="Prefill even when the memory estimate exceeds what the device has free."),
]
Server = Annotated[
    str | None,
    typer.Option(
        "--server",
        help="Answer through a running `fastkv serve` at this URL; `auto`: if one answers, else here; "
        "`off`: here [default: $FASTKV_SERVER].",
        show_default=False,
    ),
]
Each = Annotated[bool, typer.Option("--each", help="One run per document, the model loaded once.")]
Ray = Annotated[
    str | None,
    typer.Option(
        "--ray",
        help="Run the documents (or caches) on Ray workers (implies --each): alone, on a local runtime; with "
        "ADDRESS (auto, ray://host:10001, host:6379), on that cluster.",
        show_default=False,
    ),
]
RayWorkers = Annotated[
    int | None, typer.Option(min=1, help="Ray workers, each loading the model once [default: one per CPU or GPU].")
]
RayGpusPerWorker = Annotated[float, typer.Option(min=0.0, help="GPUs each Ray worker takes (GPU clusters).")]


# --- option groups: several options a command takes together, passed to it as one value ----------------


def option_group(name: str, make: Callable[..., object], options: dict[str, tuple[object, object]], last=False):
    """A decorator giving a command the Typer options `options` (name -> (Annotated type, default)), before its
    own (`last`: after them), and passing their values to it as the one argument `name`: make(**values). The decorators
    above it (--server's) still see each option by its own name."""
    added = [
        inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
        for key, (kind, default) in options.items()
    ]

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            values = {key: kwargs.pop(key) for key in options}
            return command(*args, **kwargs, **{name: make(**values)})

        signature = inspect.signature(command)
        kept = [parameter for parameter in signature.parameters.values() if parameter.name != name]
        arguments = [p for p in kept if p.default is p.empty and p.kind is not p.KEYWORD_ONLY]
        rest = [p.replace(kind=p.KEYWORD_ONLY) for p in kept if p not in arguments]
        ordered = [*arguments, *rest, *added] if last else [*arguments, *added, *rest]  # as --help lists them
        wrapper.__signature__ = signature.replace(parameters=ordered)
        wrapper.__annotations__ = {  # what Typer reads the options' types from
            **{key: value for key, value in command.__annotations__.items() if key != name},
            **{key: kind for key, (kind, _) in options.items()},
        }
        return wrapper

    return decorate


def method_options(method: str, **parameters):
    from core.options import MethodOptions

    return MethodOptions(method, **parameters)


def decoding(max_new_tokens: int, temperature: float, top_p: float, seed: int | None):
    from core.generation import Decoding, Sampling

    return Decoding(max_new_tokens, Sampling(temperature, top_p, seed))


@dataclass(frozen=True)
class ModelSpec:
    """--model, --device and --dtype: which model to load and where (None: the defaults)."""

    model: str | None = None
    device: str | None = None
    dtype: str | None = None


@dataclass(frozen=True)
class RayChoice:
    """--ray and its settings: run on Ray workers at `address` (None: a local runtime)."""

    address: str | None
    workers: int | None = None
    gpus_per_worker: float = 0.0


def ray_choice(ray: str | None, ray_workers: int | None, ray_gpus_per_worker: float) -> RayChoice | None:
    if ray is None:
        return None
    return RayChoice(None if ray == LOCAL_RAY else ray, ray_workers, ray_gpus_per_worker)


SELECTION = {
    "method": (MethodName, None),
    "budget": (Budget, None),
    "tsp_layer": (TspLayer, None),
    "tsp_rate": (TspRate, None),
    "pooling": (Pooling, None),
    "window": (Window, None),
    "head_budget": (HeadBudget, None),
}
DECODING = {"max_new_tokens": (MaxNewTokens, 256), "temperature": (Temperature, 0.0), "top_p": (TopP, 1.0)}
RAY = {"ray": (Ray, None), "ray_workers": (RayWorkers, None), "ray_gpus_per_worker": (RayGpusPerWorker, 0.0)}
selection_options = option_group("selection", method_options, SELECTION)
ask_selection_options = option_group("selection", method_options, {**SELECTION, "filter_layer": (FilterLayer, None)})
decoding_options = option_group("decoding", decoding, {**DECODING, "seed": (Seed, None)}, last=True)
ray_options = option_group("ray", ray_choice, RAY, last=True)
DEVICE = {"device": (Device, None), "dtype": (Dtype, None)}
model_options = option_group("spec", ModelSpec, {"model": (Model, None), **DEVICE}, last=True)
BuiltWith = Annotated[
    str | None,
    typer.Option("--model", "-m", help="The model the cache was built with [default: the one the file names]."),
]
built_with_options = option_group("spec", ModelSpec, {"model": (BuiltWith, None), **DEVICE}, last=True)
