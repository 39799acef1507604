"""MeanFlow (Geng et al. 2025) as a training objective: a student with a second time input, the interval t - r
(``interval_embed``), learns the average velocity u(z_t, r, t) with the target v - (t - r) du/dt
(:mod:`dit_jax.diffusion.meanflow`: the (t, r) sampler, the JVP, the adaptive weight) and samples in 1 or 2 steps
(``dit_jax.sample(..., method="meanflow", steps=1)``).

The instantaneous velocity v of the target is ``distill.meanflow.velocity``:
  'data'     v = noise - x0, MeanFlow's own training from data; labels / text dropped with the kind's dropout
             probability so the model also learns the unconditional velocity.
  'teacher'  v = the frozen teacher's CFG velocity at z_t, scale ``distill.meanflow.guidance`` (the guidance of the
             released few-step models is folded into the student, sampled without CFG); no dropout.
The interval enters the model in its own time units (time_scale (t - r): 0..1 for SiT's convention, 0..1000 for
SD3's); at r = t the interval embedder, zero at start, is silent, so a student initialised from a flow teacher
starts with u = the teacher's velocity.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dit_jax.diffusion import flow
from dit_jax.diffusion import meanflow as mf
from dit_jax.distill.guidance import guidance_target


def meanflow_distillation_loss(config: ml_collections.ConfigDict, kind, student: nnx.Module, teacher: nnx.Module,
                               batch: dict, key: jax.Array) -> jax.Array:
  """MeanFlow's adaptively weighted loss of one batch (sigma space; the model's convention converted)."""
  m = config.distill.meanflow
  x0 = batch["image"]
  k_t, k_noise, k_drop = jax.random.split(key, 3)
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  conv = flow.CONVENTIONS[config.flow.convention]
  t, r = mf.sample_times(k_t, x0.shape[0], t_sampler=m.t_sampler, loc=m.loc, scale=m.scale,
                         equal_fraction=m.equal_fraction)
  z = flow.interpolate(x0, noise, t)
  c = x0.shape[-1]
  if m.velocity == "teacher":
    g = jnp.full((x0.shape[0],), m.guidance, jnp.float32)
    v = conv.to_sd3_velocity(guidance_target(kind, config, teacher, batch, z, conv.model_time(t), g))[..., :c]
    drop_key = None
  else:
    v = flow.velocity_target(x0, noise)
    drop_key = k_drop

  def u_fn(z, r, t):
    net = kind.network(config, student, batch, drop_key, interval=conv.time_scale * (t - r))
    return conv.to_sd3_velocity(net(z, conv.model_time(t)))[..., :c]

  u, u_tgt = mf.meanflow_target(u_fn, z, v, t, r)
  return mf.adaptive_weighted_loss(u, u_tgt, p=m.p, c=m.c)
