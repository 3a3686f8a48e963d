"""The architecture as tests: layering, no import cycles, small modules, imports at the top.

Imports are read from the source (ast), module by module, including those inside functions
(an import that hides in a function to dodge a cycle is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "experts", "merging")
MAX_LINES = 400
MAX_EXPERTS_ENTRIES = 12
# Imports allowed inside functions: heavy or optional dependencies loaded lazily on purpose.
LAZY_OK = {"uvicorn", "transformers", "peft", "nevergrad", "mergekit", "torch", "safetensors", "ray", "psycopg",
           "playwright", "yaml", "cma", "sklearn"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


MODULES = modules()


def _resolve(name: str) -> str | None:
    """The module of ours that `name` (a module or a module.attribute) refers to."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """(imported module of ours, line, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for a in child.names:
                    out.append((a.name, child.lineno, nested))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - child.level + 1] + ([base] if base else []))
                for a in child.names:
                    out.append((f"{base}.{a.name}" if _resolve(f"{base}.{a.name}") else base, child.lineno, nested))
            elif isinstance(child, ast.If) and _is_type_checking(child):
                continue  # annotations only
            else:
                visit(child, inner)

    visit(tree, False)
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return ((isinstance(t, ast.Name) and t.id == "TYPE_CHECKING")
            or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"))


def graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for mod, path in MODULES.items():
        deps = set()
        for name, _, _ in imports(path, mod):
            target = _resolve(name)
            if target is not None and target != mod and not mod.startswith(target + "."):
                deps.add(target)
        g[mod] = deps
    return g


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(g.get(v, ())):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state:
                found = dfs(w)
                if found:
                    return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(g):
        if v not in state:
            found = dfs(v)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_detection_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("layer,forbidden", [("merging", ("app", "experts")), ("experts", ("app",))])
def test_layering(layer, forbidden):
    bad = []
    for mod, path in MODULES.items():
        if mod.split(".")[0] != layer:
            continue
        for name, line, _ in imports(path, mod):
            if name.split(".")[0] in forbidden:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_modules_are_small():
    big = [f"{p.relative_to(ROOT)}: {n} lines" for p in MODULES.values()
           if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not big, "\n".join(big)


def test_imports_are_at_the_top():
    """Imports inside functions only for heavy or optional third-party dependencies (lazy on purpose)."""
    bad = []
    for mod, path in MODULES.items():
        for name, line, nested in imports(path, mod):
            top = name.split(".")[0]
            if nested and top not in LAZY_OK:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name} inside a function")
    assert not bad, "\n".join(bad)


def test_experts_top_level_stays_small():
    entries = [p.name for p in (ROOT / "experts").iterdir() if p.name not in ("__init__.py", "__pycache__")]
    assert len(entries) <= MAX_EXPERTS_ENTRIES, sorted(entries)
    for sub in (ROOT / "experts").iterdir():
        if sub.is_dir() and sub.name != "__pycache__":
            init = sub / "__init__.py"
            assert init.is_file() and ast.get_docstring(ast.parse(init.read_text())), f"{sub.name}/ needs a docstring"


def test_tests_mirror_the_packages():
    """Every test module lives under the package it tests (tests/app, tests/experts/<sub>, tests/merging)."""
    for path in (ROOT / "tests").rglob("test_*.py"):
        rel = path.relative_to(ROOT / "tests").parts
        if len(rel) == 1:
            continue  # cross-cutting suites (layout, fuzzing, leaks, crashes) at the top
        assert rel[0] in PACKAGES + ("bench",), path
        if rel[0] == "experts" and len(rel) > 2:
            assert (ROOT / "experts" / rel[1]).is_dir(), f"tests/experts/{rel[1]} has no experts/{rel[1]}"
