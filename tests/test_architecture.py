"""The package's layering (docs/architecture.md): no module imports from a stage above its own."""

from __future__ import annotations

import ast
import importlib
import warnings
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
    if len(parts) == 1 or parts[1] in ("__init__", "_compat", "__main__"):
        return "<root>"
    return parts[1] if parts[1] in ORDER else "<app>"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


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
                found.add(mod)
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


def test_every_module_sits_in_a_known_stage():
    top = {p.stem for p in PKG.glob("*.py")} - {"__init__", "__main__", "_compat"}
    apps = {"cli"}  # application packages (cli: one module per command group), not pipeline stages
    top |= {p.name for p in PKG.iterdir() if p.name in apps and (p / "__init__.py").exists()}
    # compare_t2i: the text-to-image demo has its own data, metrics and report (compare.py is class-conditional)
    # pipeline: ARDPipeline, the diffusers-style text-to-image entry point (student + T5 + VAE from folders)
    # ladder: the convergence ladder (one long run per student, evaluated at increasing budgets)
    assert top == {"cli", "compare", "compare_t2i", "ladder", "presets", "sample", "generate", "pipeline"}
    folders = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders - apps == set(ORDER) - {"<app>"}


@pytest.mark.parametrize("old,new", sorted(__import__("ardistill._compat", fromlist=["MOVED"]).MOVED.items()))
def test_old_import_paths_still_work_with_a_warning(old, new):
    target = importlib.import_module(f"ardistill.{new}")
    public = [n for n in vars(target) if not n.startswith("_")]
    if old == "data":
        with pytest.warns(FutureWarning, match="ardistill.data.digits"):
            assert ardistill.data.load_digits_split is target.load_digits_split
        return
    import sys
    sys.modules.pop(f"ardistill.{old}", None)
    with pytest.warns(FutureWarning, match=f"ardistill.{new}"):
        mod = importlib.import_module(f"ardistill.{old}")
    for name in public:
        assert getattr(mod, name) is getattr(target, name), name


def test_readme_names_work_at_old_and_new_paths():
    from ardistill.models.dit import DiT
    from ardistill.models.student import ARDStudent
    from ardistill.sampling.ode import solve
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from ardistill.dit import DiT as OldDiT
        from ardistill.ode import solve as old_solve
        from ardistill.student import ARDStudent as OldStudent
    assert (OldDiT, OldStudent, old_solve) == (DiT, ARDStudent, solve)
