"""I/O: atomic file writes, teacher and student checkpoint formats and loaders, image files, the process group.

Everything that crosses the process boundary. Imports ``ardistill.models`` and ``ardistill.sampling``.
"""
