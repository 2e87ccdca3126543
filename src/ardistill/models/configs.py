"""What every model config shares: strict reading from a file's dict, and named sizes in a registry."""

from __future__ import annotations

from dataclasses import replace


class BackboneConfig:
    """What the configs of the DiT backbone (DiTConfig, TextDiTConfig) derive the same way; a mixin of dataclasses."""

    @property
    def out_channels(self) -> int:
        """2 x in_channels with learned sigma (the ODE uses the first in_channels)."""
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @classmethod
    def from_dict(cls, d: dict):
        return strict_from_dict(cls, d)


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
