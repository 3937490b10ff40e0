"""The architecture as the code has it (docs/architecture.md): each package imports only the packages
below it, no module imports another in a circle (imports inside functions and type-only imports
included), ORM row types never leave ``indexer.storage``, and there is one SQLAlchemy declarative base."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("indexer", "search", "clustering", "web", "flagmatch")
# lowest first: a layer may import itself and any layer before it, never one after it
LAYERS = ("indexer.errors", "indexer.media", "indexer.storage", "indexer.models", "indexer.vectors",
          "indexer.hashbanks", "indexer.review", "indexer.ingest", "search", "clustering", "web", "flagmatch")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The project modules ``name`` imports, anywhere in the file."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> int:
    for i, prefix in reversed(list(enumerate(LAYERS))):
        if module == prefix or module.startswith(prefix + "."):
            return i
    return -1  # the package roots (``indexer``): nothing in them


def test_every_module_belongs_to_a_layer():
    assert [m for m in MODULES if _layer(m) < 0 and MODULES[m].read_text().strip()] == []


def test_no_package_imports_one_above_it():
    upward = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() for t in ts if _layer(t) > _layer(m))
    assert upward == []


def test_no_import_circles():
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(GRAPH[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2
    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_orm_rows_never_leave_storage():
    from indexer.storage import tables
    rows = {n for n, v in vars(tables).items() if isinstance(v, type) and hasattr(v, "__tablename__")} | {"Base"}
    leaks = []
    for name, path in MODULES.items():
        if name.startswith("indexer.storage"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("indexer.storage"):
                leaks += [f"{name}: {a.name}" for a in node.names if a.name in rows]
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "select" or \
                    isinstance(node, ast.ImportFrom) and node.module == "sqlalchemy":
                leaks.append(f"{name}: queries the database itself (line {node.lineno})")
    assert leaks == []


def test_one_declarative_base():
    bases = [f"{name}:{node.lineno}" for name, path in MODULES.items() for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.ClassDef) and any(getattr(b, "id", "") == "DeclarativeBase" for b in node.bases)]
    assert bases == ["indexer.storage.tables:25"] or (len(bases) == 1 and bases[0].startswith("indexer.storage.tables"))
