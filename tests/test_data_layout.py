"""qformer.data's shape: no import cycle (function-level and TYPE_CHECKING imports included),
no lazy imports of qformer modules, images only through qformer.images, modules of a readable size."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qformer"
DATA = PACKAGE / "data"
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path) -> list[tuple[str, ast.stmt, bool]]:
    """Every qformer module ``path`` imports, anywhere in the file: (module, statement, whether
    the statement is at the module's top level, i.e. not in a function or an ``if`` block)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found.extend((t, node, id(node) in top) for t in targets if t in MODULES)
    return found


def graph() -> dict[str, set[str]]:
    return {name: {t for t, _, _ in imports(path)} for name, path in MODULES.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_through_qformer_data():
    found = [c for c in cycles(graph()) if any(m.startswith("qformer.data") for m in c)]
    assert found == [], f"import cycles: {found}"


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]] and cycles({"a": {"b"}, "b": set()}) == []


def test_no_lazy_imports_of_qformer_modules_and_no_vision():
    lazy, vision = [], []
    for path in DATA.rglob("*.py"):
        for target, node, toplevel in imports(path):
            if not toplevel:  # inside a function or an `if TYPE_CHECKING:` block
                lazy.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {target}")
            if target == "qformer.vision" or target.startswith("qformer.vision."):
                vision.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert lazy == [], f"qformer modules imported lazily (only heavy third-party ones may be): {lazy}"
    assert vision == [], f"image loading / preprocessing comes from qformer.images, not qformer.vision: {vision}"


def test_modules_are_of_a_readable_size():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in DATA.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > MAX_LINES} == {}
