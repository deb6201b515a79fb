"""The Typer app: `fastkv ask` and `fastkv cache build|query|info`; each parses, calls core, renders."""

import functools
import inspect
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from core.errors import FastKVError, InputError
from fastkv_cli import options
from fastkv_cli.help import PlainCommand
from fastkv_cli.inputs import read_questions, stdin_questions
from fastkv_cli.render import progress_reporter, show, show_built, show_info, stderr, stream_to_stdout

if TYPE_CHECKING:  # the commands import core (and torch) only when they run
    from core.generation import Decoding
    from core.options import MethodOptions

app = typer.Typer(
    help="Question answering over long documents with a compressed (FastKV) prefill.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: usage with plain metavars, no type column (tests/cli/test_help.py)
)
cache_app = typer.Typer(
    help="Prefill documents once into a .fkv file, then answer questions from it.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(cache_app, name="cache")


@app.callback()
def main() -> None:
    """fastkv reads long documents once and answers questions about them with a local LLM."""


class Terminated(BaseException):
    """SIGTERM as an exception, so that cleanup (temp files, staging folders) runs as for Ctrl-C."""


def raise_terminated(signum, frame):
    raise Terminated()


def handle_sigterm(handler):
    """Install `handler` for SIGTERM and return the previous one (None where signals cannot be set:
    outside the main thread)."""
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


def one_line_errors(command):
    """Map core's errors to one line on stderr and their exit code; Ctrl-C exits 130, SIGTERM 143."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        debug = os.environ.get("FASTKV_DEBUG") == "1"
        previous = handle_sigterm(raise_terminated)
        try:
            return command(*args, **kwargs)
        except FastKVError as error:
            if debug:
                raise
            stderr.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            stderr.print("interrupted", highlight=False)
            raise typer.Exit(130) from None
        except Terminated:
            stderr.print("terminated", highlight=False)
            raise typer.Exit(143) from None
        except typer.Exit:  # a command's own exit status (a corpus run with failures: 1)
            raise
        except BrokenPipeError:  # `fastkv ... | head`: the reader left; nothing more to say
            silence_output()
            raise typer.Exit(0) from None
        except Exception as error:  # a bug, not bad input: still one line unless debugging
            if debug:
                raise
            stderr.print(
                f"[red]internal error:[/red] {escape(f'{type(error).__name__}: {error}')} (FASTKV_DEBUG=1 shows the traceback)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None
        finally:
            if previous is not None:
                handle_sigterm(previous)

    return wrapper


def through_server(name: str):
    """Give a command --server: when a server is chosen (--server URL, else $FASTKV_SERVER; `auto`: one
    that answers), the command runs through it with fastkv_cli.client.NAME (no torch imported here);
    otherwise it runs in this process as before."""

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, server: str | None = None, **arguments):
            choice = server if server is not None else os.environ.get("FASTKV_SERVER")
            if choice:
                from fastkv_cli import client

                if (remote := client.connect(choice)) is not None:
                    return getattr(client, name)(remote, *args, **remote_arguments(arguments))
            return command(*args, **arguments)

        signature = inspect.signature(command)
        extra = inspect.Parameter("server", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=options.Server)
        wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), extra])
        return wrapper

    return decorate


CORPUS_OPTIONS = {"each": False, "ray": None, "ray_workers": None, "ray_gpus_per_worker": 0.0}


def remote_arguments(arguments: dict) -> dict:
    """A command's arguments for the server path, which runs one request at a time: --each and --ray
    are refused there (one line), and left out of the request otherwise."""
    for key, default in CORPUS_OPTIONS.items():
        if key in arguments and arguments.pop(key) != default:
            flag = "--" + key.replace("_", "-")
            raise InputError(f"{flag} does not run through a server; pass --server off to run it here")
    return arguments


def silence_output() -> None:
    """Point stdout and stderr at /dev/null, so that flushing them at exit raises no second
    BrokenPipeError ("Exception ignored ... BrokenPipeError") and sets no exit status 120."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (AttributeError, OSError, ValueError):  # not a real file (tests), or already closed
            pass
    os.close(devnull)


def quiet_transformers() -> None:
    """transformers' own progress bars and warnings would mix into our stderr."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_engine(spec: options.ModelSpec, quiet: bool):
    from core.engine import Engine

    quiet_transformers()
    with progress_reporter(quiet) as progress:
        return Engine.load(spec.model, spec.device, spec.dtype, progress)


def read_inputs(paths: list[str], quiet: bool, limit):
    """Read the documents as far as the model's window can use them (`limit`, from the loaded engine)."""
    from core.documents import read_documents

    start = time.perf_counter()
    with progress_reporter(quiet) as progress:
        on_page = lambda done, total: progress("reading PDF pages", done, total)  # noqa: E731
        documents = read_documents(paths, on_page=on_page, limit=limit)
    return documents, time.perf_counter() - start


@app.command(cls=PlainCommand)
@one_line_errors
@through_server("ask")
@options.ask_selection_options
@options.ray_options
@options.decoding_options
@options.model_options
def ask(
    documents: Annotated[list[str], typer.Argument(help="Text or PDF files; '-' reads stdin.", show_default=False)],
    question: Annotated[str, typer.Argument(help="The question to answer.", show_default=False)],
    truncate: options.Truncate = None,
    ignore_memory: options.IgnoreMemory = False,
    json: options.Json = False,
    quiet: options.Quiet = False,
    each: options.Each = False,
    *,
    spec: options.ModelSpec,
    selection: "MethodOptions",
    decoding: "Decoding",
    ray: options.RayChoice | None,
) -> None:
    """Answer QUESTION about the documents in one pass (the question steers what the cache keeps);
    with --each, about each document alone.

    \b
    Examples:
      fastkv ask report.pdf "What was the revenue in 2023?"
      fastkv ask contracts/*.pdf "Who signs for the buyer?" --each --json
    """
    method = selection.make()
    if each or ray:
        from core.corpus import AskTask
        from fastkv_cli.each import Corpus, Renderer, ask_records, document_items, run

        corpus = Corpus(spec, ray)
        task = AskTask(question, method, decoding, truncate, ignore_memory)
        items = document_items(documents)
        renderer = Renderer(len(items), json, quiet, "documents", streams=True)
        loader = lambda: load_engine(spec, quiet)  # noqa: E731
        raise typer.Exit(run(corpus, task, items, loader, renderer, ask_records(question)))
    engine = load_engine(spec, quiet)
    docs, read_s = read_inputs(documents, quiet, engine.ask_limit(question, decoding.max_new_tokens, truncate))
    with progress_reporter(quiet) as progress:
        on_text = (lambda text: None) if json else stream_to_stdout
        answer = engine.ask(docs, question, method, decoding, truncate, on_text, progress, ignore_memory)
    answer.stats.read_s = read_s
    show(answer, json, quiet)


@cache_app.command("build", cls=PlainCommand)
@one_line_errors
@through_server("cache_build")
@options.selection_options
@options.ray_options
@options.model_options
def cache_build(
    documents: Annotated[list[str], typer.Argument(help="Text or PDF files; '-' reads stdin.", show_default=False)],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="The .fkv file to write; with --each, the directory for one file per document (on a Ray "
            "cluster: a path every node sees).",
            show_default=False,
        ),
    ],
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite OUTPUT if it exists; with --each, rebuild up-to-date caches.")
    ] = False,
    query_budget: Annotated[
        str | None,
        typer.Option(help="Re-select down to this budget at query time with each question (two-stage)."),
    ] = None,
    questions: Annotated[
        Path | None, typer.Option(help="A file of expected questions, one per line, to steer what is kept.")
    ] = None,
    query_aware: Annotated[
        bool | None,
        typer.Option(
            "--query-aware/--question-blind",
            help="--question-blind (the default, with kvzip): select once, without the question, for every later "
            "question: a small file and a fast query. --query-aware (fastkv): pause the prefill at fastkv's TSP "
            "layer, caching every token up to there; each question resumes it, so answers equal `ask` at --budget, "
            "at the cost of half a prefill per question and a larger file.",
            show_default=False,
        ),
    ] = None,
    cache_dtype: options.CacheDtype = None,
    truncate: options.Truncate = None,
    ignore_memory: options.IgnoreMemory = False,
    json: options.Json = False,
    quiet: options.Quiet = False,
    each: options.Each = False,
    *,
    spec: options.ModelSpec,
    selection: "MethodOptions",
    ray: options.RayChoice | None,
) -> None:
    """Prefill the documents once and save the cache to OUTPUT for later `cache query`; with --each, one
    cache per document in the directory OUTPUT, skipping those already up to date.

    \b
    Examples:
      fastkv cache build report.pdf -o report.fkv     # selected once (kvzip)
      fastkv cache build report.pdf -o asked.fkv --query-aware  # as `ask`
      fastkv cache build library/*.pdf --each -o caches/
    """
    from core.options import BuildOptions
    from core.storage import check_target

    if not (each or ray):
        check_target(output, force)
    plan = BuildOptions(
        method=selection,
        query_budget=query_budget,
        questions=tuple(read_questions(questions)) if questions else (),
        query_aware=query_aware,
        cache_dtype=cache_dtype,
        truncate=truncate,
        ignore_memory=ignore_memory,
    ).resolve()
    if each or ray:
        from core.corpus import BuildTask, cache_targets
        from fastkv_cli.each import Corpus, Renderer, build_records, document_items, output_directory, run

        corpus = Corpus(spec, ray)
        directory = output_directory(output)  # workers elsewhere (Ray) need its absolute path
        items = document_items(documents, cache_targets(documents, directory.resolve() if ray else directory))
        renderer = Renderer(len(items), json, quiet, "caches to build", streams=False)
        loader = lambda: load_engine(spec, quiet)  # noqa: E731
        raise typer.Exit(run(corpus, BuildTask(plan, force), items, loader, renderer, build_records))
    engine = load_engine(spec, quiet)
    docs, read_s = read_inputs(documents, quiet, engine.build_limit(truncate))
    with progress_reporter(quiet) as progress:
        built = engine.build_file(docs, output, plan, force, progress)
    built.saved.stats.read_s = read_s
    show_built(built.to_dict(), json, quiet)


@cache_app.command("query", cls=PlainCommand)
@one_line_errors
@through_server("cache_query")
@options.decoding_options
@options.built_with_options
def cache_query(
    cache_file: Annotated[Path, typer.Argument(help="A .fkv file from `fastkv cache build`.", show_default=False)],
    questions: Annotated[
        list[str] | None, typer.Argument(help="Questions; none: one per line from stdin.", show_default=False)
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(
            help="Re-select the stored tokens down to this budget with each question; for a query-aware cache, "
            "the budget each question finishes the prefill with [default: the file's]."
        ),
    ] = None,
    json: options.Json = False,
    quiet: options.Quiet = False,
    *,
    spec: options.ModelSpec,
    decoding: "Decoding",
) -> None:
    """Answer each question from the saved cache; the model and the cache load once, reported with the first
    answer only: every answer's stats are its own.

    \b
    Example:
      fastkv cache query report.fkv "Who audited it?" "When?"
    """
    from core.methods import Budget
    from core.storage import read_manifest

    reselect = None if budget is None else Budget.parse(budget)
    manifest = read_manifest(cache_file)
    engine = load_engine(replace(spec, model=spec.model or manifest.model.spec), quiet)
    saved = engine.load_saved(cache_file)
    for question in questions or stdin_questions():
        on_text = (lambda text: None) if json else stream_to_stdout
        show(engine.query(saved, question, reselect, decoding, on_text), json, quiet)


@cache_app.command("ask", cls=PlainCommand)
@one_line_errors
@options.ray_options
@options.decoding_options
@options.built_with_options
def cache_ask(
    targets: Annotated[
        list[str],
        typer.Argument(
            help=".fkv files or directories of them, then the question (none with --questions).", show_default=False
        ),
    ],
    questions: Annotated[
        Path | None, typer.Option(help="A file of questions, one per line, asked of every cache.")
    ] = None,
    budget: Annotated[
        str | None, typer.Option(help="As for `cache query`: re-select to this budget with each question.")
    ] = None,
    json: options.Json = False,
    quiet: options.Quiet = False,
    *,
    spec: options.ModelSpec,
    decoding: "Decoding",
    ray: options.RayChoice | None,
) -> None:
    """Ask every cache the question (or each question of --questions): one answer per cache and question.
    `cache query` asks one cache many questions; `cache ask` asks many caches.

    \b
    Examples:
      fastkv cache ask caches/ "Who signs for the buyer?" --json
      fastkv cache ask caches/a.fkv caches/b.fkv --questions checklist.txt --json
    """
    from core.corpus import Item, QueryTask, cache_files
    from core.methods import Budget
    from core.storage import read_manifest
    from fastkv_cli.each import Corpus, Renderer, query_records, run

    if questions is None:
        if len(targets) < 2:
            raise InputError("give the caches and then the question, or --questions FILE")
        targets, asked = targets[:-1], (targets[-1],)
    else:
        asked = tuple(read_questions(questions))
    files = cache_files(targets)
    task = QueryTask(asked, None if budget is None else Budget.parse(budget), decoding)
    spec = replace(spec, model=spec.model or first_model(files, read_manifest))
    corpus = Corpus(spec, ray)
    items = [Item(i, path, target=os.path.abspath(path)) for i, path in enumerate(files)]
    renderer = Renderer(len(items), json, quiet, "caches", streams=True)
    loader = lambda: load_engine(spec, quiet)  # noqa: E731
    raise typer.Exit(run(corpus, task, items, loader, renderer, query_records(asked)))


def first_model(files: list[str], read_manifest) -> str | None:
    """The model the first readable cache names (the others are checked against it as they load)."""
    for path in files:
        try:
            return read_manifest(Path(path)).model.spec
        except FastKVError:
            continue
    return None


@cache_app.command("info", cls=PlainCommand)
@one_line_errors
@through_server("cache_info")
def cache_info(
    cache_file: Annotated[Path, typer.Argument(help="A .fkv file.", show_default=False)],
    json: options.Json = False,
) -> None:
    """Show what a cache holds: model, method, documents, and which pages the kept tokens come from.

    \b
    Example:
      fastkv cache info report.fkv
    """
    from core.storage import describe_cache

    show_info(describe_cache(cache_file), json)


@app.command(cls=PlainCommand)
@one_line_errors
@options.model_options
def serve(
    host: Annotated[
        str, typer.Option(help="Address to listen on; anything but localhost is reachable by others.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free one).")] = 8765,
    allow_dir: Annotated[
        list[Path] | None,
        typer.Option(
            help="A directory whose documents and caches clients may name (repeatable) [default: the current one]."
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="FASTKV_TOKEN", help="Require `Authorization: Bearer TOKEN` on every request [$FASTKV_TOKEN]."
        ),
    ] = None,
    queue: Annotated[int, typer.Option(min=0, help="Requests that may wait while one runs; more get HTTP 503.")] = 4,
    cache_memory_mb: Annotated[
        int, typer.Option(min=0, help="Memory for loaded .fkv caches, least recently used evicted first (MiB).")
    ] = 2048,
    max_upload_mb: Annotated[
        int, typer.Option(min=1, help="Largest request body, uploaded documents included (MiB).")
    ] = 32,
    quiet: options.Quiet = False,
    *,
    spec: options.ModelSpec,
) -> None:
    """Keep one model loaded and answer over HTTP: ask, cache build/query/info, OpenAI chat completions.

    \b
    Example:
      fastkv serve --port 8765   # then: fastkv ask DOC QUESTION --server auto
    """
    from fastkv_cli.server.app import LOCAL_HOSTS, listening_socket, serve_forever
    from fastkv_cli.server.settings import Settings

    settings = Settings.of(allow_dir or [Path.cwd()], token, queue, cache_memory_mb, max_upload_mb)
    if host not in LOCAL_HOSTS:
        stderr.print(
            f"[yellow]warning:[/yellow] listening on {escape(host)}: other machines can reach this server"
            + ("" if settings.token else "; set --token (or FASTKV_TOKEN) so that only your clients can use it"),
            highlight=False,
        )
    sock = listening_socket(host, port)  # a port in use fails now, not after the model loads
    engine = load_engine(spec, quiet)
    loaded = engine.loaded

    def announce(url: str) -> None:
        dirs = ", ".join(str(path) for path in settings.allow_dirs)
        stderr.print(
            f"fastkv serve: listening on {url} · {escape(loaded.name)} on {loaded.device.type} · "
            f"paths under {escape(dirs)}" + (" · token required" if settings.token else ""),
            highlight=False,
            soft_wrap=True,
        )

    try:
        serve_forever(engine, settings, sock, announce)
    except (KeyboardInterrupt, Terminated):  # before the server took over the signals: still a clean stop
        pass
    stderr.print("fastkv serve: stopped", highlight=False)
