"""Training objectives, chosen by name (``config.objective``): each maps a network, clean latents x0 and their
noise to the batch's mean loss.

  vp:   the IDDPM hybrid loss (eps MSE + the variational bound of the learned variance), t ~ U{0..999}.
  flow: rectified flow, x_s = (1 - s) x0 + s noise, velocity MSE against noise - x0, s from ``config.flow``
        (t-sampler, shift) in the model's own time convention (``flow.CONVENTIONS``).
"""
from __future__ import annotations

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


def flow_loss(config: ml_collections.ConfigDict, net: NetFn, x0: jax.Array, noise: jax.Array,
              key: jax.Array) -> jax.Array:
  """Velocity MSE on the rectified-flow path; extra output channels (a learned sigma) are ignored."""
  f = config.flow
  conv = flow.CONVENTIONS[f.convention]
  sigma = flow.sample_sigmas(key, (x0.shape[0],), f.t_sampler, f.loc, f.scale, f.mode_scale)
  if f.shift != 1.0:
    sigma = flow.shift_sigmas(sigma, f.shift)
  pred = conv.to_sd3_velocity(net(flow.interpolate(x0, noise, sigma), conv.model_time(sigma))[..., :x0.shape[-1]])
  return jnp.mean((pred - flow.velocity_target(x0, noise)) ** 2)


OBJECTIVES: dict[str, Objective] = {"vp": vp_loss, "flow": flow_loss}
