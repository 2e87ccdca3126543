"""docs/architecture.md names only what exists: every file path and every ``ardistill.…`` name it cites."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import ardistill

ROOT = Path(__file__).resolve().parents[1]
PKG = Path(ardistill.__file__).resolve().parent
DOC = ROOT / "docs" / "architecture.md"

_CODE = re.compile(r"`([^`]+)`")
# a source file, a script, a file under a folder (assets/x.safetensors), or a folder "name/"
_PATH = re.compile(r"^[\w./-]+\.(py|sh)$|^[\w.-]+/[\w./-]+\.(md|json|safetensors)$|^[\w-]+/$")
_NAME = re.compile(r"^ardistill(\.\w+)+$")
_FILE_ATTR = re.compile(r"^([\w/]+\.py): (\w+(\.\w+)*)$")  # "models/dit.py: DiT"


def resolve(dotted: str) -> bool:
    """Whether ``ardistill.a.b.C.d`` exists: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def path_exists(text: str) -> bool:
    """A path relative to src/ardistill/, the repository root, or named by its file name in the package."""
    text = text.rstrip("/")
    return any((base / text).exists() for base in (PKG, ROOT)) or (
        "/" not in text and any(PKG.rglob(text)))


def missing_names(doc: str) -> list[str]:
    """The code spans of ``doc`` that name a file, module or function which does not exist."""
    bad = []
    for span in _CODE.findall(doc):
        span = span.strip()
        m = _FILE_ATTR.match(span)
        if m:
            module = "ardistill." + m.group(1)[:-3].replace("/", ".")
            if not (path_exists(m.group(1)) and resolve(f"{module}.{m.group(2)}")):
                bad.append(span)
        elif _NAME.match(span):
            if not resolve(span):
                bad.append(span)
        elif _PATH.match(span) and not span.startswith(("runs/", "http")):
            if not path_exists(span):
                bad.append(span)
    return bad


def checked_part(doc: str) -> str:
    """The doc without its section on old import paths (names that are gone by definition)."""
    return doc.split("## Old import paths")[0]


def test_architecture_doc_names_only_what_exists():
    assert missing_names(checked_part(DOC.read_text())) == []


def test_the_doc_check_can_fail():
    doc = ("`models/dit.py: DiT` `models/gone.py` `ardistill.models.student.ARDStudent.sample` "
           "`ardistill.models.student.NoSuchThing` `models/dit.py: no_such_function` `cli/`")
    assert missing_names(doc) == ["models/gone.py", "ardistill.models.student.NoSuchThing",
                                  "models/dit.py: no_such_function"]


def test_the_doc_cites_every_package_module():
    """Each module of the package appears in the doc by its file name, so a new module gets documented."""
    doc = checked_part(DOC.read_text())
    modules = sorted(p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py")
                     if p.name not in ("__init__.py", "__main__.py"))
    assert [m for m in modules if Path(m).name not in doc] == []
