"""Files shipped inside the package: the teachers and classifiers of the embedded digits and photos, the text teacher.

How each was made (commands, wall time, held-out accuracy, Fréchet distances): docs/digits.md and docs/photos.md;
the text-to-image teacher of the two-digit benchmark: docs/t2i.md.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
DIGITS_TEACHER = ASSETS_DIR / "digits_teacher.safetensors"  # EMA weights, DiTConfig in the metadata
DIGITS_TEACHER_CONFIG = ASSETS_DIR / "digits_teacher.json"  # resolved training config, losses, wall time
DIGITS_CLASSIFIER = ASSETS_DIR / "digits_classifier.safetensors"  # feature network for the digits metrics
DIGITS_CLASSIFIER_CONFIG = ASSETS_DIR / "digits_classifier.json"
# Text-to-image: TextDiT (PixArt form) on two digits side by side; TextDiTConfig and encoder spec inside.
DIGITS_T2I_TEACHER = ASSETS_DIR / "digits_t2i_teacher.safetensors"
DIGITS_T2I_TEACHER_CONFIG = ASSETS_DIR / "digits_t2i_teacher.json"  # command, wall time, losses, adherence, sha256
PHOTOS_TEACHER = ASSETS_DIR / "photos_teacher.safetensors"  # the photos benchmark's teacher (EMA)
PHOTOS_TEACHER_CONFIG = ASSETS_DIR / "photos_teacher.json"
PHOTOS_CLASSIFIER = ASSETS_DIR / "photos_classifier.safetensors"  # feature network for the photos metrics
PHOTOS_CLASSIFIER_CONFIG = ASSETS_DIR / "photos_classifier.json"


def shipped(path: Path, what: str) -> Path:
    """The asset's path, or FileNotFoundError naming it (a source checkout without its assets)."""
    if not path.exists():
        raise FileNotFoundError(f"the shipped {what} is missing: {path} (reinstall ardistill, or pass a path)")
    return path
