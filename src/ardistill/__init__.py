"""ardistill: autoregressive distillation (ARD) of diffusion transformers.

The package follows the pipeline (docs/architecture.md): ``sampling`` and ``models`` at the bottom,
then ``io``, ``data``, ``training``, ``evaluation``, and the applications (``cli``, ``compare``,
``presets``, ``sample``, ``generate``) on top.
"""

__version__ = "0.1.0"
