"""Every module of lora_ablate imports on its own, and the package's modules import one another without a
cycle (arrows point down: config -> model/targets/data -> trial -> engines -> study/commands)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora_ablate"


def modules() -> dict[str, Path]:
    """Dotted module name -> its file, for every module of the package (a package is its __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file (top level, in functions, under
    TYPE_CHECKING): ``from a.b import c`` counts as a.b.c when that is a module, else as a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [_path_through(sorted(c), edges) for c in components]


def _path_through(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest closed import path inside ``component`` from its first module back to it."""
    start, members = component[0], set(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if w not in came_from:
                    came_from[w] = v
                    nxt.append(w)
        frontier = nxt
    return component


def test_the_import_graph_has_no_cycle():
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_cycles_are_found_and_reported():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(edges) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "lora_ablate"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import x\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from lora_ablate import low\n    from .. import low as again\n")
    known = {"lora_ablate": pkg / "__init__.py", "lora_ablate.low": pkg / "low.py",
             "lora_ablate.sub": pkg / "sub" / "__init__.py", "lora_ablate.sub.leaf": pkg / "sub" / "leaf.py"}
    assert imported("lora_ablate.sub", known["lora_ablate.sub"], known) == {"lora_ablate.sub.leaf"}
    assert imported("lora_ablate.sub.leaf", known["lora_ablate.sub.leaf"], known) == {"lora_ablate.low"}


def _import_alone(name: str) -> tuple[str, int, str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1",  # nothing written into the checkout
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    return name, proc.returncode, proc.stderr.strip().splitlines()[-1] if proc.returncode else ""


def test_every_module_imports_alone():
    """Each in a fresh interpreter, a few at a time (most pay torch's import); ``__main__`` runs the command
    line when imported, so it is only parsed (by the graph above)."""
    names = sorted(n for n in modules() if not n.endswith(".__main__"))
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        failed = [(n, err) for n, rc, err in pool.map(_import_alone, names) if rc]
    assert not failed, "\n".join(f"{n}: {err}" for n, err in failed)
