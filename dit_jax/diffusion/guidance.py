"""Classifier-free guidance (class labels or text embeddings) and skip-layer guidance.

    out = uncond + scale * (cond - uncond)

``mode="all"`` guides every predicted latent channel (diffusers, SD3). ``mode="dit"`` guides only the first three
channels, as facebookresearch/DiT's ``forward_with_cfg`` does (a GLIDE leftover; needed to reproduce FID 2.27):
channel 3 keeps the conditional prediction. Learned-variance channels are never guided. A guidance interval
(lo, hi) on the normalised noise level tau in [0, 1] (1 = pure noise; tau = t/T for VP, sigma for flow) applies
guidance only where lo <= tau <= hi and skips the unconditional pass elsewhere.

Skip-layer guidance (SD3.5 Medium; Stability's ``SkipLayerCFGDenoiser``, diffusers' ``skip_guidance_layers``) then
adds ``slg_scale * (cond - cond_with_layers_skipped)`` on the steps i (0-based) of its window
``start * steps < i < stop * steps``, one extra conditional-only forward pass per step inside the window.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

CFG_MODES = ("all", "dit")
DIT_GUIDED_CHANNELS = 3

# (x (B, H, W, C), model time (B,), condition with leading batch axis (B, ...)) -> (B, H, W, C_out)
CondModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
LabelModelFn = CondModelFn  # the condition is (B,) class ids
GuidedFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class SkipLayerGuidance:
  """Skip-layer guidance settings: skipped block indices, scale, and the step window as fractions of the steps."""

  layers: tuple[int, ...]
  scale: float
  start: float = 0.01
  stop: float = 0.2

  @classmethod
  def parse(cls, spec: SkipLayerGuidance | Mapping | None) -> SkipLayerGuidance | None:
    """None, an instance, or a mapping {"layers", "scale", "start"?, "stop"?} (e.g. a preset's ConfigDict)."""
    if spec is None or isinstance(spec, SkipLayerGuidance):
      return spec
    if not isinstance(spec, Mapping) and not hasattr(spec, "to_dict"):
      raise ValueError(f"skip_layer_guidance must be a mapping with layers, scale, start, stop, got {type(spec)}")
    spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    unknown = sorted(set(spec) - {"layers", "scale", "start", "stop"})
    if unknown or "layers" not in spec or "scale" not in spec:
      raise ValueError(f"skip_layer_guidance needs keys layers and scale (optional start, stop), got {sorted(spec)}")
    layers = spec["layers"]
    layers = (layers,) if isinstance(layers, int | np.integer) else tuple(layers)
    if not layers or not all(isinstance(i, int | np.integer) for i in layers):
      raise ValueError(f"skip_layer_guidance layers must be a non-empty list of block indices, got {spec['layers']}")
    return cls(tuple(int(i) for i in layers), float(spec["scale"]), float(spec.get("start", 0.01)),
               float(spec.get("stop", 0.2)))

  def window(self, steps: int) -> np.ndarray:
    """(steps,) bool: step i is guided iff start * steps < i < stop * steps (Stability and diffusers)."""
    return np.array([self.start * steps < i < self.stop * steps for i in range(steps)], bool)


def combine(cond: jax.Array, uncond: jax.Array, scale: float, guided_channels: int) -> jax.Array:
  """Guide the first ``guided_channels`` channels; the rest keep the conditional output."""
  guided = uncond[..., :guided_channels] + scale * (cond[..., :guided_channels] - uncond[..., :guided_channels])
  return jnp.concatenate([guided, cond[..., guided_channels:]], axis=-1)


def guided(model_fn: CondModelFn, cond: Any, uncond: Any, scale: float, *, latent_channels: int, mode: str = "all",
           interval: tuple[float, float] | None = None,
           noise_level: Callable[[jax.Array], jax.Array] | None = None,
           skip_fn: CondModelFn | None = None, skip_scale: float = 0.0,
           skip_active: Callable[[jax.Array], jax.Array] | None = None) -> GuidedFn:
  """A guided (x, t) -> output function for any batched condition (a pytree whose leaves lead with B).

  The conditional and unconditional passes run as one doubled batch [x, x] with [cond, uncond], as the references.

  Args:
    model_fn: the network, called as model_fn(x, t, condition).
    cond, uncond: the condition and the unconditional one, same structure and shapes.
    scale: guidance scale; 1 disables guidance (single conditional pass).
    latent_channels: C, the number of predicted (eps or velocity) channels.
    mode: 'all' or 'dit'.
    interval: optional (lo, hi) on the noise level tau; ``noise_level`` maps t (B,) to tau.
    skip_fn: the network with some layers skipped (skip-layer guidance); added as skip_scale * (cond_out -
      skip_fn(x, t, cond)) wherever ``skip_active(t)`` (a scalar bool) holds.
  """
  if mode not in CFG_MODES:
    raise ValueError(f"unknown cfg mode {mode!r}; choose one of {', '.join(CFG_MODES)}")
  conditional = lambda x, t: model_fn(x, t, cond)
  if scale == 1.0 and skip_fn is None:
    return conditional
  guided_channels = DIT_GUIDED_CHANNELS if mode == "dit" else latent_channels

  def with_cond(x, t):  # -> (guided output, conditional output)
    if scale == 1.0:
      out = conditional(x, t)
      return out, out
    pair = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), cond, uncond)
    c, u = jnp.split(model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), pair), 2)
    return combine(c, u, scale, guided_channels), c

  cfg = with_cond
  if interval is not None:
    if noise_level is None:
      raise ValueError("a guidance interval needs the sampler's noise level")
    lo, hi = interval

    def cfg(x, t):
      tau = noise_level(t[:1])[0]
      unguided = lambda x, t: (lambda out: (out, out))(conditional(x, t))
      return jax.lax.cond((tau >= lo) & (tau <= hi), with_cond, unguided, x, t)

  if skip_fn is None:
    return lambda x, t: cfg(x, t)[0]
  if skip_active is None:
    raise ValueError("skip-layer guidance needs its step window")

  def skip_guided(x, t):
    out, c = cfg(x, t)
    add = lambda: out + skip_scale * (c - skip_fn(x, t, cond))
    return jax.lax.cond(skip_active(t), add, lambda: out)

  return skip_guided


def classifier_free(model_fn: LabelModelFn, labels: jax.Array, null_label: int, scale: float, *, latent_channels: int,
                    mode: str = "all", interval: tuple[float, float] | None = None,
                    noise_level: Callable[[jax.Array], jax.Array] | None = None) -> GuidedFn:
  """:func:`guided` for class labels: (B,) ids against the null class ``null_label``."""
  return guided(model_fn, labels, jnp.full_like(labels, null_label), scale, latent_channels=latent_channels,
                mode=mode, interval=interval, noise_level=noise_level)
