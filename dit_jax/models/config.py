"""Shared by every config: the JSON round trip of the frozen model-config dataclasses and the validation loop."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
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


def check_all(checks: Iterable[tuple[bool, str]], what: str) -> None:
  """Raise ``ValueError("<what>: <message>")`` for the first ``(ok, message)`` that is not ok."""
  for ok, message in checks:
    if not ok:
      raise ValueError(f"{what}: {message}")
