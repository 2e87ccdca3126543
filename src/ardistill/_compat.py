"""Old flat module paths (``ardistill.dit``, ``ardistill.student``, ...) for one release, with a warning.

Until 0.2 the package was 40 modules side by side; issue 11 grouped them by pipeline stage. Code that
imports an old path gets the moved module's contents through an alias module and a ``FutureWarning``
naming the new path. Remove this file (and its import in ``ardistill/__init__.py``) in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

MOVED = {  # old module (under ardistill.) -> new module (under ardistill.)
    "diffusion": "sampling.diffusion", "guidance": "sampling.guidance", "ode": "sampling.ode",
    "layers": "models.layers", "dit": "models.dit", "masks": "models.masks", "kv_cache": "models.kv_cache",
    "student": "models.student", "naive_student": "models.naive_student", "gan": "models.discriminator",
    "fileio": "io.fileio", "checkpoints": "io.checkpoints", "student_io": "io.student_io",
    "distributed": "io.distributed", "images": "io.images",
    "data": "data.digits", "image_data": "data.image_folder", "vae": "data.vae",
    "trajectories": "data.trajectories", "record": "data.record",
    "train": "training.distill", "train_utils": "training.loop", "ema": "training.ema",
    "finetune_gan": "training.finetune_gan", "teacher_training": "training.teacher",
    "metrics": "evaluation.metrics", "features": "evaluation.features", "inception": "evaluation.inception",
    "classifier": "evaluation.classifier", "adm": "evaluation.adm", "evaluate": "evaluation.evaluate",
    "flops": "evaluation.flops",
}
# ``ardistill.data`` is now a package (the data stage); its old contents live in ``ardistill.data.digits``.
# The package re-exports them lazily (see data/__init__.py), so it is not aliased here.
_ALIASED = {f"ardistill.{old}": f"ardistill.{new}" for old, new in MOVED.items() if old != "data"}


class _AliasModule(types.ModuleType):
    """A module whose attributes are those of the moved module."""

    def __init__(self, name: str, target: str):
        super().__init__(name)
        self.__dict__["_target_name"] = target

    def _target(self) -> types.ModuleType:
        return importlib.import_module(self.__dict__["_target_name"])

    def __getattr__(self, attr: str):
        return getattr(self._target(), attr)

    def __dir__(self):
        return dir(self._target())


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return _AliasModule(spec.name, self.target)

    def exec_module(self, module):
        importlib.import_module(self.target)


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Finds ``ardistill.<old>`` and serves the alias, warning once per module."""

    def find_spec(self, fullname, path=None, target=None):
        new = _ALIASED.get(fullname)
        if new is None:
            return None
        warnings.warn(f"{fullname} moved to {new}; the old path works until ardistill 0.3 "
                      f"(see docs/architecture.md)", FutureWarning, stacklevel=2)
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
