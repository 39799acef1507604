"""Sampling presets: ``configs/sampling/<name>.py`` files whose ``get_config(flavour)`` gives method, steps, shift,
CFG scale and skip-layer guidance (FLUX: also the distilled guidance and the schedule) for one model family, in named
flavours (e.g. the model authors' reference defaults and diffusers' pipeline defaults)."""
from __future__ import annotations

import importlib.util
import pathlib
from typing import Any

import ml_collections

from dit_jax.diffusion import flow
from dit_jax.diffusion.guidance import SkipLayerGuidance
from dit_jax.diffusion.samplers import FLOW_METHODS


PRESET_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs" / "sampling"
PRESET_KEYS = ("method", "steps", "shift", "cfg_scale", "skip_layer_guidance")
OPTIONAL_KEYS = ("guidance", "schedule")  # FLUX: distilled guidance, 'reference' / 'diffusers' schedule (None)


def make_preset(flavours: dict[str, dict[str, Any]], flavour: str | None):
  """A preset file's ``get_config(flavour)``: the named flavour (default: the first) as a ConfigDict."""
  flavour = flavour or next(iter(flavours))
  if flavour not in flavours:
    raise ValueError(f"unknown preset flavour {flavour!r}; choose one of {', '.join(flavours)}")
  return ml_collections.ConfigDict({"flavour": flavour, **flavours[flavour]})


def preset_names() -> list[str]:
  return sorted(p.stem for p in PRESET_DIR.glob("*.py") if not p.name.startswith("_"))


def load_preset(name_or_path: str, flavour: str | None = None):
  """Load a sampling preset: a name in configs/sampling/ ('sd35_medium') or a .py path with ``get_config``;
  'NAME:FLAVOUR' (or ``flavour``) picks a flavour, e.g. 'sd35_medium:diffusers'. Returns a validated ConfigDict
  with method, steps, shift (None: the model kind's default, e.g. FLUX's resolution-dependent shift), cfg_scale,
  skip_layer_guidance (None or layers / scale / start / stop), guidance, schedule (None unless the preset sets
  them) and flavour."""
  text, _, suffix = str(name_or_path).partition(":")
  flavour = flavour or suffix or None
  path = pathlib.Path(text)
  if path.suffix != ".py":
    path = PRESET_DIR / f"{text}.py"
    if not path.is_file():
      raise ValueError(f"unknown sampling preset {text!r}; choose one of {', '.join(preset_names())} or a .py path")
  elif not path.is_file():
    raise FileNotFoundError(f"sampling preset {path} not found")
  spec = importlib.util.spec_from_file_location(f"_dit_jax_preset_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"sampling preset {path} has no get_config()")
  config = module.get_config(flavour) if flavour else module.get_config()
  missing = [k for k in PRESET_KEYS if k not in config]
  unknown = sorted(set(config.keys()) - set(PRESET_KEYS) - set(OPTIONAL_KEYS) - {"flavour"})
  if missing or unknown:
    raise ValueError(f"sampling preset {path.name}: missing {missing or 'nothing'}, unknown keys {unknown or 'none'}")
  if config.method not in FLOW_METHODS or not isinstance(config.steps, int) or config.steps <= 0 \
      or (config.shift is not None and config.shift <= 0) or config.cfg_scale < 0 \
      or config.get("schedule") not in (None, *flow.FLUX_SCHEDULES) \
      or (config.get("guidance") is not None and config.guidance < 0):
    raise ValueError(f"sampling preset {path.name}: invalid method / steps / shift / cfg_scale / guidance / "
                     f"schedule ({config.method}, {config.steps}, {config.shift}, {config.cfg_scale}, "
                     f"{config.get('guidance')}, {config.get('schedule')})")
  SkipLayerGuidance.parse(config.skip_layer_guidance)
  with config.unlocked():
    for key in OPTIONAL_KEYS:
      config[key] = config.get(key)
  return config
