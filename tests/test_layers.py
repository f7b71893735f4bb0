"""The package's layers, read from the source: no import cycle (function-level and TYPE_CHECKING
imports count too), no function-level import of a qformer module, imports that point down the
layers, and no module far past ~600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qformer"

# Bottom up. A module may import modules of its own layer or below, never above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("configs and utilities", ("config", "errors", "io", "weights", "images", "video", "distributed", "plugins", "tokenizer",
                               "testing")),
    ("model parts", ("med", "losses", "llm", "vision")),
    ("Blip2 features and heads", ("model",)),
    ("objectives, generation, persistence, data", ("momentum", "stage1", "stage2", "generation", "inference", "explain",
                                                   "figures", "persistence", "data")),
    ("the user-facing model", ("blip2",)),
    ("training", ("training", "sharding", "checkpoints", "metric_log", "run", "loop", "adapters", "cli")),
    ("evaluation", ("eval", "search", "capfilt")),
    ("recipes' glue", ("recipe",)),
    ("plugins' own worlds", ("toy",)),
    ("applications", ("demo",)),
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom, names: dict[str, Path]) -> list[str]:
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("qformer"):
        return []
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in names else target)
    return out


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """(module -> qformer modules it imports, [(module, imported, line) of function-level imports])."""
    names = _modules()
    graph: dict[str, set[str]] = {m: set() for m in names}
    nested: list[tuple[str, str, int]] = []
    for module, path in names.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        function_level: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        function_level.add(id(inner))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(module, is_package, node, names)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("qformer")]
            for t in targets:
                graph[module].add(t)
                if id(node) in function_level:
                    nested.append((module, t, node.lineno))
    return graph, nested


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import): each is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _layer(module: str) -> int:
    first = module.split(".")[1] if "." in module else ""
    for i, (_, members) in enumerate(LAYERS):
        if first in members:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def test_no_import_cycle():
    graph, _ = import_graph()
    # A package's __init__ re-exporting its submodules is not a dependency of those submodules.
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in qformer/: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]


def test_no_function_level_import_of_qformer_modules():
    _, nested = import_graph()
    assert not nested, "function-level imports of qformer modules (import at the top instead): " + ", ".join(
        f"{m}:{line} -> {t}" for m, t, line in nested)


def test_imports_point_down_the_layers():
    graph, _ = import_graph()
    upward = []
    for module, targets in graph.items():
        if module == "qformer":
            continue  # the package's front door re-exports from every layer
        for t in targets:
            if t == "qformer":
                upward.append(f"{module} -> qformer (the package front door; import the module instead)")
            elif _layer(t) > _layer(module):
                upward.append(f"{module} ({LAYERS[_layer(module)][0]}) -> {t} ({LAYERS[_layer(t)][0]})")
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_readable(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 620, f"{path.relative_to(PACKAGE.parent)} has {lines} lines: split it by concept"
