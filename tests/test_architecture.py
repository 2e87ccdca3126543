"""The package's layering (docs/architecture.md): no module imports from a stage above its own."""

from __future__ import annotations

import ast
import importlib
from collections import deque
from pathlib import Path

import pytest

import ardistill

PKG = Path(ardistill.__file__).resolve().parent
# Bottom to top. A module may import its own stage and the stages below it, never one above.
# ``assets`` (shipped files and their paths) imports nothing; the applications at the top level
# (cli, compare, presets, sample, generate) may import everything.
ORDER = ["assets", "sampling", "models", "io", "data", "training", "evaluation", "<app>"]


def stage_of(module: str) -> str:
    """``ardistill.models.dit`` -> ``models``; a top-level module is an application."""
    parts = module.split(".")
    assert parts[0] == "ardistill", module
    if len(parts) == 1 or parts[1] in ("__init__", "__main__"):
        return "<root>"
    return parts[1] if parts[1] in ORDER else "<app>"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def is_module(name: str) -> bool:
    """Whether ``ardistill.x.y`` names a module or package of the source tree (not a function or class)."""
    path = PKG.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def ardistill_imports(path: Path) -> set[str]:
    """Every ardistill module that a file imports, at module level or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "ardistill":  # from ardistill import x: x is a subpackage or module
                found.update(f"ardistill.{a.name}" for a in node.names)
            elif mod.startswith("ardistill."):
                found.add(mod)  # from ardistill.io import distributed: the module ardistill.io.distributed too
                found.update(f"{mod}.{a.name}" for a in node.names if is_module(f"{mod}.{a.name}"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ardistill."))
    return found


def layering_violations() -> list[str]:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        importer = module_name(path)
        src = stage_of(importer)
        if src == "<root>":
            continue
        for dep in sorted(ardistill_imports(path)):
            dst = stage_of(dep)
            if dst == "<root>":
                bad.append(f"{importer} imports the package root ({dep})")
            elif ORDER.index(dst) > ORDER.index(src):
                bad.append(f"{importer} ({src}) imports {dep} ({dst}), a stage above it")
    return bad


def test_no_stage_imports_a_stage_above_it():
    assert layering_violations() == []


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    # The check must be able to fail: a models file that imports training is reported.
    fake = PKG / "models" / "_layering_probe.py"
    assert not fake.exists()
    fake.write_text("def f():\n    from ardistill.training.distill import DistillConfig\n")
    try:
        assert layering_violations() == [
            "ardistill.models._layering_probe (models) imports ardistill.training.distill (training), "
            "a stage above it"]
    finally:
        fake.unlink()


# Import cycles tolerated while a refactor removes them (none today); each entry must still exist (a stale entry
# fails the test, so it is deleted when its cycle goes). The modules of one cycle, exactly.
KNOWN_CYCLES: set[frozenset[str]] = set()


def import_graph() -> dict[str, set[str]]:
    """Module -> the ardistill modules it imports (module level or inside functions), over the source tree."""
    graph = {module_name(path): ardistill_imports(path) for path in sorted(PKG.rglob("*.py"))}
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def import_cycles(graph: dict[str, set[str]] | None = None) -> list[tuple[frozenset[str], list[str]]]:
    """Every group of modules that import each other (a strongly connected component of the graph), with its
    shortest cycle through the group's first module by name, [a, b, ..., a]."""
    graph = import_graph() if graph is None else graph
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for group in sorted(groups, key=min):
        start = min(group)  # the shortest way back to it inside the group (breadth first)
        prev, queue = {start: None}, deque([start])
        while start not in graph[v := queue.popleft()]:
            for w in sorted(graph[v] & group):
                if w not in prev:
                    prev[w] = v
                    queue.append(w)
        path = []
        while v is not None:
            path.append(v)
            v = prev[v]
        cycles.append((frozenset(group), path[::-1] + [start]))
    return cycles


def test_no_import_cycles():
    cycles = import_cycles()
    unexpected = [" -> ".join(path) + (f" (the group also holds {sorted(group - set(path))})" if group - set(path) else "")
                  for group, path in cycles if group not in KNOWN_CYCLES]
    assert unexpected == [], f"import cycles: {unexpected}"
    stale = KNOWN_CYCLES - {group for group, _ in cycles}
    assert not stale, f"known cycles gone, delete their KNOWN_CYCLES entries: {[sorted(c) for c in stale]}"


def test_the_cycle_checker_sees_a_cycle():
    # The check must be able to fail: two modules that import each other (one inside a function) are named.
    a, b = PKG / "evaluation" / "_cycle_probe_a.py", PKG / "evaluation" / "_cycle_probe_b.py"
    assert not a.exists() and not b.exists()
    try:
        a.write_text("def f():\n    from ardistill.evaluation import _cycle_probe_b\n")
        b.write_text("import ardistill.evaluation._cycle_probe_a\n")
        probe = ["ardistill.evaluation._cycle_probe_a", "ardistill.evaluation._cycle_probe_b"]
        assert (frozenset(probe), probe + probe[:1]) in import_cycles()
    finally:
        a.unlink(missing_ok=True)
        b.unlink(missing_ok=True)
    assert import_cycles({"x": {"y", "z"}, "y": {"z"}, "z": {"x", "w"}, "w": set()}) == [
        (frozenset("xyz"), ["x", "z", "x"])]
    assert import_cycles({"x": {"y"}, "y": set()}) == []


def test_every_module_sits_in_a_known_stage():
    top = {p.stem for p in PKG.glob("*.py")} - {"__init__", "__main__", "_compat"}
    # application packages (cli: the commands; comparison: demo and sweep; ladder: the convergence ladder), not stages
    apps = {"cli", "comparison", "ladder"}
    top |= {p.name for p in PKG.iterdir() if p.name in apps and (p / "__init__.py").exists()}
    # pipeline: ARDPipeline, the diffusers-style text-to-image entry point (student + T5 + VAE from folders)
    # ladder: the convergence ladder (one long run per student, evaluated at increasing budgets)
    assert top == {"cli", "comparison", "ladder", "presets", "sample", "generate", "pipeline"}
    folders = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders - apps == set(ORDER) - {"<app>"}


def test_readme_names_work_at_new_paths():
    from ardistill.models.dit import DiT
    from ardistill.models.student import ARDStudent
    from ardistill.sampling.ode import solve
    assert (DiT.__module__, ARDStudent.__module__, solve.__module__) == (
        "ardistill.models.dit", "ardistill.models.student", "ardistill.sampling.ode")
    for old in ("ardistill.dit", "ardistill.student", "ardistill.ode"):  # the flat paths are gone (issue 24)
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old)
