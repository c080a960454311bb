"""Build one frozen config dataclass from another object's same-named settings.

A recipe section, a command line and the library configs they feed spell most settings alike
(``num_images``, ``calibration_steps``); ``same_named`` passes those across, so only the settings
that differ in name or form are written out::

    QuantizeConfig = same_named(QuantizeConfig, variant_recipe, options=dict(...), overwrite=True)
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

Config = TypeVar("Config")


def same_named(cls: type[Config], values: Any, **overrides: Any) -> Config:
    """``cls`` built from the attributes of ``values`` named like its fields, then ``overrides``."""
    taken = {f.name: getattr(values, f.name) for f in fields(cls) if hasattr(values, f.name)}  # type: ignore[arg-type]
    return cls(**{**taken, **overrides})
