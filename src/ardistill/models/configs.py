"""What every model config shares: strict reading from a file's dict, and named sizes in a registry."""

from __future__ import annotations

from dataclasses import replace


def strict_from_dict(cls, d: dict):
    """``cls(**d)`` for a config dataclass, refusing fields it does not have (a file from another version)."""
    unknown = set(d) - set(cls.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return cls(**d)


def registered_config(cls, registry: dict[str, dict], what: str, name: str, **overrides):
    """The config of a registered size ``name`` of ``registry``, with field overrides."""
    if name not in registry:
        raise KeyError(f"unknown {what} size {name!r}; choose from {sorted(registry)}")
    return replace(cls(**registry[name]), **overrides)
