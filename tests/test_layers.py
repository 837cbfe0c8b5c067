"""The package's layers, read from its source: no import cycles, and each layer imports only
what is below it (docs/architecture.md, "Packages")."""

from __future__ import annotations

import ast
from pathlib import Path

import poolwatch

ROOT = Path(poolwatch.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(module: str, *, lazy: bool) -> set[str]:
    """poolwatch modules ``module`` imports: at its top level (``TYPE_CHECKING`` blocks
    included), and inside functions too when ``lazy``."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    nodes = ast.walk(tree) if lazy else _top_level(tree.body)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                ).strip(".")
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return {name for name in found if name in MODULES and name != module}


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    out: list[ast.stmt] = []
    for node in body:
        out.append(node)
        if isinstance(node, ast.If):  # if TYPE_CHECKING:, and the like
            out.extend(_top_level(node.body))
            out.extend(_top_level(node.orelse))
        elif isinstance(node, ast.Try):
            out.extend(_top_level(node.body))
            for handler in node.handlers:
                out.extend(_top_level(handler.body))
    return out


def _cycles(lazy: bool) -> list[list[str]]:
    graph = {module: _imports(module, lazy=lazy) for module in MODULES}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for following in sorted(graph[node]):
            if state.get(following) == 1:
                cycles.append([*path[path.index(following) :], following])
            elif following not in state:
                visit(following)
        path.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_no_import_cycles() -> None:
    """Not at import time, and not through imports inside functions either."""
    assert _cycles(lazy=False) == []
    assert _cycles(lazy=True) == []


def _layer(module: str) -> str:
    for prefix, layer in (
        ("poolwatch.adapters", "adapters"),
        ("poolwatch.diagnostics", "diagnostics"),
        ("poolwatch.cli", "cli"),
        ("poolwatch._demo", "demo"),
        ("poolwatch._bootstrap", "bootstrap"),
    ):
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return module


LEAVES = {
    "poolwatch._models",
    "poolwatch._catalogue",
    "poolwatch._version",
    "poolwatch._safe",
    "poolwatch._naming",
}
"""Value types and constants: they import nothing of poolwatch but each other."""


def test_leaves_import_only_leaves() -> None:
    for module in LEAVES:
        assert _imports(module, lazy=True) <= LEAVES, module


def test_adapters_see_only_the_core_they_report_into() -> None:
    """An adapter knows one library and the ledger it writes into, nothing of export,
    registry, diagnostics or the command line."""
    allowed = LEAVES | {"poolwatch._ledger", "poolwatch._config"}
    for module in MODULES:
        if _layer(module) == "adapters":
            outside = {m for m in _imports(module, lazy=True) if _layer(m) != "adapters"}
            assert outside <= allowed, (module, outside - allowed)


def test_the_core_and_diagnostics_know_no_command_line_and_no_demo() -> None:
    for module in MODULES:
        if _layer(module) in ("adapters", "diagnostics") or module in (
            "poolwatch._ledger",
            "poolwatch._registry",
            "poolwatch._collect",
            "poolwatch._export",
            "poolwatch._api",
        ):
            reached = {_layer(m) for m in _imports(module, lazy=True)}
            assert not reached & {"cli", "demo"}, module


def test_the_command_line_reaches_the_instrumentation_only_to_run_the_demo() -> None:
    """``top`` and ``doctor`` read a process over HTTP: they import no export, no registry
    (``poolwatch.cli.demo`` and ``run`` start poolwatch, inside the functions that do)."""
    for name in ("poolwatch.cli", "poolwatch.cli.top", "poolwatch.cli.table"):
        reached = _imports(name, lazy=False)
        assert not reached & {"poolwatch._api", "poolwatch._export", "poolwatch._provider"}, name
