"""Guidance distillation (Meng et al. 2023, stage one; FLUX.1 [dev]'s design): a student with a guidance input g
regresses the teacher's classifier-free-guided output, so sampling needs one model call per step instead of two.

    x_t = (1 - s) x0 + s noise,   s from config.flow (t-sampler, shift)
    g ~ U[distill.guidance_range]  (per example)
    target = teacher(x_t, t, uncond) + g (teacher(x_t, t, cond) - teacher(x_t, t, uncond))
    loss = mean (student(x_t, t, cond, guidance=g) - target)^2

The combination is the sampler's CFG (``out = u + s (c - u)``) in the model's own output space, so a student that
has learnt it and is sampled with ``guidance=g`` follows the teacher's CFG trajectories at scale g. The student has
no label / text dropout (it is always conditioned); its guidance embedder starts at zero, so a student initialised
from the teacher starts as the conditional teacher.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dit_jax.diffusion import flow
from dit_jax.diffusion.objectives import training_sigmas


def guidance_target(kind, config: ml_collections.ConfigDict, teacher: nnx.Module, batch: dict, x_t: jax.Array,
                    t: jax.Array, g: jax.Array) -> jax.Array:
  """The teacher's CFG output u + g (c - u) at (x_t, t), (B, H, W, C_out), gradient stopped."""
  cond = kind.network(config, teacher, batch, None)(x_t, t)
  uncond = kind.network(config, teacher, batch, None, uncond=True)(x_t, t)
  g = g.reshape(g.shape + (1,) * (cond.ndim - 1))
  return jax.lax.stop_gradient(uncond + g * (cond - uncond))


def guidance_distillation_loss(config: ml_collections.ConfigDict, kind, student: nnx.Module, teacher: nnx.Module,
                               batch: dict, key: jax.Array) -> jax.Array:
  """Mean squared error of the student's guided output against the teacher's CFG combination (channels of the
  latent only: a learned-sigma half is not distilled)."""
  x0 = batch["image"]
  k_t, k_noise, k_g = jax.random.split(key, 3)
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  sigma = training_sigmas(config, k_t, x0.shape)
  lo, hi = config.distill.guidance_range
  g = jax.random.uniform(k_g, (x0.shape[0],), jnp.float32, lo, hi)
  x_t = flow.interpolate(x0, noise, sigma)
  t = flow.CONVENTIONS[config.flow.convention].model_time(sigma)
  target = guidance_target(kind, config, teacher, batch, x_t, t, g)
  pred = kind.network(config, student, batch, None, guidance=g)(x_t, t)
  c = x0.shape[-1]
  return jnp.mean((pred[..., :c] - target[..., :c]) ** 2)
