"""Training objectives, chosen by name (``config.objective``): each maps a network, clean latents x0 and their
noise to the batch's mean loss.

  vp:   the IDDPM hybrid loss (eps MSE + the variational bound of the learned variance), t ~ U{0..999}.
  flow: rectified flow, x_s = (1 - s) x0 + s noise, velocity MSE against noise - x0, s from ``config.flow``
        (t-sampler, shift or FLUX's resolution_shift) in the model's own time convention (``flow.CONVENTIONS``).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from dit_jax.diffusion import flow, vp

NetFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x (B, H, W, C), model time (B,)) -> (B, H, W, C_out)
Objective = Callable[[ml_collections.ConfigDict, NetFn, jax.Array, jax.Array, jax.Array], jax.Array]


def vp_loss(config: ml_collections.ConfigDict, net: NetFn, x0: jax.Array, noise: jax.Array,
            key: jax.Array) -> jax.Array:
  """IDDPM hybrid loss over the 1000-step linear schedule; the network returns [eps, variance interpolation]."""
  diffusion = vp.create_diffusion("")
  t = jax.random.randint(key, (x0.shape[0],), 0, diffusion.num_timesteps)
  return diffusion.training_losses(net, x0, t, noise)["loss"].mean()


def resolution_shift(config: ml_collections.ConfigDict, shape: tuple[int, ...]) -> float:
  """FLUX.1's resolution-dependent shift e^mu of (B, H, W, C) latents: mu linear in the N = H W / 4 tokens of 2x2
  patches (``flow.dynamic_shift_mu`` with ``config.flow`` base_shift / max_shift; 0.5 / 1.15 give e^1.15 = 3.16 at
  1024 px)."""
  f = config.flow
  tokens = shape[1] * shape[2] // 4
  return math.exp(flow.dynamic_shift_mu(tokens, base_shift=f.base_shift, max_shift=f.max_shift))


def training_sigmas(config: ml_collections.ConfigDict, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """(B,) noise levels for (B, H, W, C) latents from ``config.flow``: the t-sampler, then the shift (or FLUX's
  resolution shift)."""
  f = config.flow
  sigma = flow.sample_sigmas(key, (shape[0],), f.t_sampler, f.loc, f.scale, f.mode_scale)
  shift = resolution_shift(config, shape) if f.resolution_shift else f.shift
  return flow.shift_sigmas(sigma, shift) if shift != 1.0 else sigma


def flow_loss(config: ml_collections.ConfigDict, net: NetFn, x0: jax.Array, noise: jax.Array,
              key: jax.Array) -> jax.Array:
  """Velocity MSE on the rectified-flow path; extra output channels (a learned sigma) are ignored."""
  conv = flow.CONVENTIONS[config.flow.convention]
  sigma = training_sigmas(config, key, x0.shape)
  pred = conv.to_sd3_velocity(net(flow.interpolate(x0, noise, sigma), conv.model_time(sigma))[..., :x0.shape[-1]])
  return jnp.mean((pred - flow.velocity_target(x0, noise)) ** 2)


OBJECTIVES: dict[str, Objective] = {"vp": vp_loss, "flow": flow_loss}
