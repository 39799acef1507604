"""JSON round trip shared by the frozen model-config dataclasses (DiTConfig, VAEConfig, MMDiTConfig)."""
from __future__ import annotations

import dataclasses
from typing import Any


class JsonConfig:
  """``to_dict`` / ``from_dict`` for a frozen dataclass; tuple fields travel as JSON lists; unknown keys are a
  one-line ValueError naming them."""

  def to_dict(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, d: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
