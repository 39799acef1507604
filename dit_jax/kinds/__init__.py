"""The model-kind registry: ``KINDS[name]`` is the :class:`Kind` that the trainer, the sampler, ``dit_jax.load``,
``sample.py`` and the converter ask about a model kind (checkpoints record the name in ``dit_jax.json``).

Adding a kind: a model module, a :class:`Kind` subclass beside these (what it trains on, how the loss and the
sampler call it, its FLOPs, its converter tables), and ``register(MyKind())``.
"""
from __future__ import annotations

from flax import nnx

from dit_jax.kinds.base import Kind, SampleSpec
from dit_jax.kinds.clip import CLIPTextKind
from dit_jax.kinds.dit import DiTKind
from dit_jax.kinds.flux import FluxKind
from dit_jax.kinds.inception import InceptionKind
from dit_jax.kinds.mmdit import MMDiTKind
from dit_jax.kinds.t5 import T5EncoderKind
from dit_jax.kinds.vae import VAEKind

KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
  """Add (or replace) a kind; returns it."""
  KINDS[kind.name] = kind
  return kind


for _kind in (DiTKind(), MMDiTKind(), VAEKind(), CLIPTextKind(), T5EncoderKind(), FluxKind(), InceptionKind()):
  register(_kind)


def get(name: str) -> Kind:
  """The kind called ``name``; a one-line ValueError names the known kinds otherwise."""
  if name not in KINDS:
    raise ValueError(f"unknown model kind {name!r}; choose one of {', '.join(KINDS)}")
  return KINDS[name]


def of(model: nnx.Module) -> Kind:
  """The kind of a model instance."""
  for kind in KINDS.values():
    if isinstance(model, kind.module):
      return kind
  raise ValueError(f"{type(model).__name__} is not a registered model kind ({', '.join(KINDS)})")


__all__ = ["KINDS", "Kind", "SampleSpec", "get", "of", "register"]
