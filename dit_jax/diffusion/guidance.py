"""Classifier-free guidance for class-conditional models.

    out = uncond + scale * (cond - uncond)

``mode="all"`` guides every predicted latent channel (diffusers, SD3). ``mode="dit"`` guides only the first three
channels, as facebookresearch/DiT's ``forward_with_cfg`` does (a GLIDE leftover; needed to reproduce FID 2.27):
channel 3 keeps the conditional prediction. Learned-variance channels are never guided. A guidance interval
(lo, hi) on the normalised noise level tau in [0, 1] (1 = pure noise; tau = t/T for VP, sigma for flow) applies
guidance only where lo <= tau <= hi and skips the unconditional pass elsewhere.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

CFG_MODES = ("all", "dit")
DIT_GUIDED_CHANNELS = 3

# (x (B, H, W, C), model time (B,), labels (B,)) -> (B, H, W, C_out)
LabelModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def combine(cond: jax.Array, uncond: jax.Array, scale: float, guided_channels: int) -> jax.Array:
  """Guide the first ``guided_channels`` channels; the rest keep the conditional output."""
  guided = uncond[..., :guided_channels] + scale * (cond[..., :guided_channels] - uncond[..., :guided_channels])
  return jnp.concatenate([guided, cond[..., guided_channels:]], axis=-1)


def classifier_free(model_fn: LabelModelFn, labels: jax.Array, null_label: int, scale: float, *, latent_channels: int,
                    mode: str = "all", interval: tuple[float, float] | None = None,
                    noise_level: Callable[[jax.Array], jax.Array] | None = None
                    ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """A guided (x, model_time) -> output function.

  The conditional and unconditional passes run as one doubled batch [x, x] with [labels, null], as the references.

  Args:
    model_fn: the network.
    labels: (B,) class ids; null_label: the unconditional id.
    scale: guidance scale; 1 disables guidance (single pass).
    latent_channels: C, the number of predicted (eps or velocity) channels.
    mode: 'all' or 'dit'.
    interval: optional (lo, hi) on the noise level tau; ``noise_level`` maps model time (B,) to tau.
  """
  if mode not in CFG_MODES:
    raise ValueError(f"unknown cfg mode {mode!r}; choose one of {', '.join(CFG_MODES)}")
  conditional = lambda x, t: model_fn(x, t, labels)
  if scale == 1.0:
    return conditional
  guided_channels = DIT_GUIDED_CHANNELS if mode == "dit" else latent_channels
  null = jnp.full_like(labels, null_label)

  def guided(x, t):
    both = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([labels, null]))
    cond, uncond = jnp.split(both, 2)
    return combine(cond, uncond, scale, guided_channels)

  if interval is None:
    return guided
  if noise_level is None:
    raise ValueError("a guidance interval needs the sampler's noise level")
  lo, hi = interval

  def within_interval(x, t):
    tau = noise_level(t[:1])[0]
    return jax.lax.cond((tau >= lo) & (tau <= hi), guided, conditional, x, t)

  return within_interval
