"""The commands' class: help that reads like a well-kept CLI's at 80 columns (`DOC... QUESTION`, `--budget
BUDGET`, no type column), and `--ray [ADDRESS]`, an option whose value may be left out."""

import re

from typer.core import TyperCommand

# metavars by parameter name; otherwise ints are N, floats X, paths PATH, the rest the name in capitals
METAVARS = {
    "documents": "DOC",
    "question": "QUESTION",
    "questions": "QUESTION",
    "cache_file": "FILE.fkv",
    "targets": "CACHE... [QUESTION]",
    "server": "URL",
    "output": "PATH",
    "ray": "[ADDRESS]",
    "allow_dir": "DIR",
    "model": "MODEL",
}
TYPE_METAVARS = {"int": "N", "float": "X", "Path": "PATH"}


def metavar(param) -> str:
    """(typer vendors its own click: parameters are told apart by what they say, not by their class)"""
    if param.name == "questions" and not is_argument(param):
        return "FILE"
    if param.name in METAVARS:
        return METAVARS[param.name]
    return TYPE_METAVARS.get(param.bare_type(), param.name.upper())


def is_argument(param) -> bool:
    return param.param_type_name == "argument"


LOCAL_RAY = "local"
RAY_ADDRESS = re.compile(r"^(auto|local|[a-z]+://\S+|[\w.-]+:\d+)$")  # what ray.init takes, as typed


def optional_ray_value(args: list[str]) -> list[str]:
    """`--ray` alone means a local runtime: it takes the next word only if that is an address, so
    `fastkv ask --ray a.txt b.txt QUESTION` keeps a.txt a document."""
    out = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        if arg == "--ray" and not (i + 1 < len(args) and RAY_ADDRESS.match(args[i + 1])):
            arg = f"--ray={LOCAL_RAY}"
        out.append(arg)
    return out


class PlainCommand(TyperCommand):
    """A command whose usage line and option list show plain metavars and no types (click's own style)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            takes_value = is_argument(param) or not (param.is_flag or param.count)
            if takes_value and param.metavar is None:
                param.metavar = metavar(param)

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if any(param.name == "ray" for param in self.params):
            args = optional_ray_value(args)
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if is_argument(param):
                name = param.metavar + ("..." if param.nargs != 1 and "..." not in param.metavar else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_options(self, ctx, formatter) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            if is_argument(param):
                name = param.metavar + ("..." if param.nargs != 1 and "..." not in param.metavar else "")
                arguments.append((name, getattr(param, "help", None) or ""))
            elif (record := param.get_help_record(ctx)) is not None:
                options.append(record)
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        if options:
            with formatter.section("Options"):
                formatter.write_dl(options)
