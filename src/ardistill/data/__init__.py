"""Data: the digits and image-folder data sets, latent codecs, the trajectory store and the recording job."""

from __future__ import annotations

import importlib
import warnings


def __getattr__(name: str):
    # Until 0.2 ``ardistill.data`` was the digits module; its names now live in ardistill.data.digits.
    digits = importlib.import_module("ardistill.data.digits")
    if name.startswith("_") or not hasattr(digits, name):
        raise AttributeError(f"module 'ardistill.data' has no attribute {name!r}")
    warnings.warn(f"ardistill.data.{name} moved to ardistill.data.digits.{name}; the old path works until "
                  f"ardistill 0.3", FutureWarning, stacklevel=2)
    return getattr(digits, name)
