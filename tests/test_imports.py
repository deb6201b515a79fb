"""One-way imports: the modules of core/ and fastkv_cli/ import each other without a cycle, counting the
imports inside functions too (one there only postpones the circle to the first call)."""

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "fastkv_cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imported(node: ast.Import | ast.ImportFrom, module: str, path: Path, modules: dict) -> set[str]:
    """The project modules one import statement names: `from A import b` names A.b where that is a module."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    base = node.module or ""
    if node.level:  # relative: from the package that holds `module`
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    named = {f"{base}.{alias.name}" for alias in node.names} & modules.keys()
    return named | ({base} & modules.keys() if len(named) < len(node.names) else set())


def import_graph() -> dict[str, set[str]]:
    """Each project module -> the project modules it imports anywhere in its file (module or function level)."""
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        nodes = ast.walk(ast.parse(path.read_text(), str(path)))
        imports = [node for node in nodes if isinstance(node, (ast.Import, ast.ImportFrom))]
        graph[module] = set().union(*(imported(node, module, path, modules) for node in imports)) - {module}
    return graph


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "fastkv_cli.server.app" in graph and "core.engine" in graph  # the walk found the packages
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as error:
        raise AssertionError(f"an import cycle: {' -> '.join(error.args[1])}") from None


def test_core_imports_nothing_from_the_cli():
    graph = import_graph()
    assert not {
        (a, b) for a, imports in graph.items() for b in imports if a.startswith("core") and b.startswith("fastkv_cli")
    }


def test_every_server_module_imports_in_dependency_order():
    """fastkv_cli.server's modules, imported one by one in a fresh interpreter, each after what it imports."""
    graph = import_graph()
    server = {module: graph[module] for module in graph if module.startswith("fastkv_cli.server")}
    order = [module for module in TopologicalSorter(server).static_order() if module in server]
    assert len(order) == len(list((ROOT / "fastkv_cli" / "server").glob("*.py")))
    probe = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    done = subprocess.run([sys.executable, "-c", probe, *order], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
