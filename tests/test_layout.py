"""The package rule, read from the source with ``ast``: ``pipeline`` imports nothing from
``catalogs``, ``model`` or ``workflows``; nothing outside ``pipeline`` imports a private name of
it; ``pipeline.phantoms`` is imported by no stage; no two modules import each other (no cycle
of any length, function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "catalogs", "model", "workflows")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:  # `from pkg import module` imports the module
                sub = f"{base}.{a.name}"
                out.append((sub, []) if sub in known else (base, [a.name]))
    return [(m, ns) for m, ns in out if m.split(".")[0] in PACKAGES]


def graph() -> dict[str, dict[str, list[str]]]:
    mods = modules()
    edges: dict[str, dict[str, list[str]]] = {}
    for name, path in mods.items():
        for target, names in imports_of(name, path, set(mods)):
            while target not in mods and "." in target:
                target = target.rpartition(".")[0]
            if target != name:
                edges.setdefault(name, {}).setdefault(target, []).extend(names)
    return edges


def cycles(edges: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_pipeline_imports_nothing_from_the_packages_above_it():
    up = [(a, b) for a, targets in graph().items() if a.split(".")[0] == "pipeline"
          for b in targets if b.split(".")[0] != "pipeline"]
    assert up == []


def test_no_stage_imports_the_phantoms():
    bad = [(a, b) for a, targets in graph().items() if a.startswith("pipeline.")
           and not a.startswith("pipeline.phantoms") for b in targets
           if b.startswith("pipeline.phantoms")]
    assert bad == []


def test_outside_pipeline_only_public_names():
    private = [(a, b, n) for a, targets in graph().items() if a.split(".")[0] != "pipeline"
               for b, names in targets.items() if b.split(".")[0] == "pipeline"
               for n in names if n.startswith("_")]
    assert private == []


def test_no_import_cycles():
    assert cycles(graph()) == []


@pytest.mark.parametrize("edges, want", [
    ({"a": {"b": []}, "b": {"a": []}}, [["a", "b"]]),
    ({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}}, [["a", "b", "c"]]),
    ({"a": {"b": []}, "b": {"c": []}}, []),
])
def test_cycle_finder(edges, want):
    assert cycles(edges) == want
