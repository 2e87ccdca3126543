"""ardistill: autoregressive distillation (ARD) of diffusion transformers.

The package follows the pipeline (docs/architecture.md): ``sampling`` and ``models`` at the bottom,
then ``io``, ``data``, ``training``, ``evaluation``, and the applications (``cli``, ``compare``,
``presets``, ``sample``, ``generate``) on top.
"""

from ardistill import _compat

__version__ = "0.1.0"

_compat.install()  # old flat import paths (ardistill.dit, ...) keep working for one release
