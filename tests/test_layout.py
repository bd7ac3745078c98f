"""The shape of the code, checked: no file over 400 lines outside tests/, no function in distributed/ or
nodes/ over 60 lines, no class over 300 lines, and no import circle among the pack's modules (imports inside
functions included: they hide a circle, they do not break it). Pure reading of the source, no import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE_LINES, MAX_FUNCTION_LINES, MAX_CLASS_LINES = 400, 60, 300


def source_files(root: Path = ROOT) -> list[Path]:
    """The pack's Python files outside tests/ (and outside any virtual environment or build folder)."""
    return sorted(p for p in root.rglob("*.py")
                  if not any(part in ("tests", "build") or part.startswith(".") for part in p.relative_to(root).parts))


def module_name(path: Path, root: Path = ROOT) -> str:
    """The module's name as the pack imports it (a script beside a package of its name, benchmarks/gpu_check.py
    beside benchmarks/gpu_check/, is named as a script so that the two stay apart)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    elif path.with_suffix("").is_dir():
        parts[-1] += ".py"
    return ".".join(["usp_video", *parts])


def imported_modules(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """The pack's modules that path imports, anywhere in the file: `from .a import b` names a.b when b is a
    module, else a; a package is imported with each of its submodules."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from a import b`: the module a.b where b is one, else a itself (b is a name defined in a)
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else stem for alias in node.names]
        else:
            continue
        for target in targets:
            # importing a.b.c runs a and a.b first; the packages around the importer itself are running already
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in modules and (prefix == target or not (name + ".").startswith(prefix + ".")):
                    found.add(prefix)
    found.discard(name)
    return found


def import_circles(root: Path = ROOT) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    files = source_files(root)
    modules = {module_name(p, root) for p in files}
    graph = {module_name(p, root): imported_modules(p, modules, root) for p in files}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_file_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in source_files() if (n := p.read_text().count("\n")) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


@pytest.mark.parametrize("kind, limit, folders", [
    ((ast.FunctionDef, ast.AsyncFunctionDef), MAX_FUNCTION_LINES, ("distributed", "nodes")),
    ((ast.ClassDef,), MAX_CLASS_LINES, None),
], ids=["functions", "classes"])
def test_no_long_function_or_class(kind, limit, folders):
    long = {}
    for path in source_files():
        rel = path.relative_to(ROOT)
        if folders and rel.parts[0] not in folders:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, kind) and (n := node.end_lineno - node.lineno + 1) > limit:
                long[f"{rel}:{node.lineno} {node.name}"] = n
    assert not long, f"over {limit} lines: {long}"


def test_no_import_circle():
    assert import_circles() == []


def test_the_circle_check_can_fail(tmp_path):
    """The check itself: two modules that import each other inside functions are a circle."""
    (tmp_path / "distributed").mkdir()
    (tmp_path / "distributed" / "__init__.py").write_text("")
    (tmp_path / "distributed" / "a.py").write_text("def f():\n    from . import b\n")
    (tmp_path / "distributed" / "b.py").write_text("from .a import f\n")
    assert import_circles(tmp_path) == [["usp_video.distributed.a", "usp_video.distributed.b"]]
