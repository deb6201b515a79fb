"""The Typer app: `fastkv ask`; every command parses, calls core, renders."""

import functools
import os
import sys
import time
from typing import Annotated

import typer

from core.documents import read_documents
from core.errors import FastKVError
from core.generation import Sampling
from core.methods import make_method
from fastkv_cli import options
from fastkv_cli.render import print_json, progress_reporter, stats_table, stderr

app = typer.Typer(
    help="Question answering over long documents with a compressed (FastKV) prefill.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """fastkv reads long documents once and answers questions about them with a local LLM."""


def one_line_errors(command):
    """Map core's errors to one line on stderr and their exit code; Ctrl-C exits 130."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FastKVError as error:
            if os.environ.get("FASTKV_DEBUG") == "1":
                raise
            stderr.print(f"[red]error:[/red] {error}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            stderr.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as error:  # a bug, not bad input: still one line unless debugging
            if os.environ.get("FASTKV_DEBUG") == "1":
                raise
            stderr.print(
                f"[red]internal error:[/red] {type(error).__name__}: {error} (FASTKV_DEBUG=1 shows the traceback)"
            )
            raise typer.Exit(1) from None

    return wrapper


def quiet_transformers() -> None:
    """transformers' own progress bars and warnings would mix into our stderr."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def stream_to_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@app.command()
@one_line_errors
def ask(
    documents: Annotated[list[str], typer.Argument(help="Text or PDF files; '-' reads stdin.", show_default=False)],
    question: Annotated[str, typer.Argument(help="The question to answer.", show_default=False)],
    method: options.MethodName = "fastkv",
    budget: options.Budget = None,
    tsp_layer: options.TspLayer = None,
    tsp_rate: options.TspRate = None,
    pooling: options.Pooling = None,
    window: options.Window = None,
    filter_layer: options.FilterLayer = None,
    model: options.Model = None,
    device: options.Device = None,
    dtype: options.Dtype = None,
    max_new_tokens: options.MaxNewTokens = 256,
    temperature: options.Temperature = 0.0,
    top_p: options.TopP = 1.0,
    seed: options.Seed = None,
    truncate: options.Truncate = None,
    json: options.Json = False,
    quiet: options.Quiet = False,
) -> None:
    """Answer QUESTION about DOCUMENTS in one pass (the question steers what the cache keeps)."""
    from core.engine import Engine

    quiet_transformers()
    sampling = Sampling(temperature, top_p, seed)
    selection = make_method(
        method,
        budget=budget,
        tsp_layer=tsp_layer,
        tsp_rate=tsp_rate,
        pooling=pooling,
        window=window,
        filter_layer=filter_layer,
    )
    with progress_reporter(quiet) as progress:
        start = time.perf_counter()
        docs = read_documents(documents, on_page=lambda done, total: progress("reading PDF pages", done, total))
        read_s = time.perf_counter() - start
        engine = Engine.load(model, device, dtype, progress)
    with progress_reporter(quiet) as progress:
        answer = engine.ask(
            docs,
            question,
            selection,
            max_new_tokens,
            sampling,
            truncate,
            on_text=(lambda text: None) if json else stream_to_stdout,
            progress=progress,
        )
    answer.stats.read_s = read_s
    if json:
        print_json(answer)
    else:
        stream_to_stdout("\n")
    if not quiet:
        stderr.print(stats_table(answer))
