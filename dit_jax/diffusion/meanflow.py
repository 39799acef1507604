"""MeanFlow (Geng et al. 2025, arXiv:2505.13447): one- and few-step generation by regressing the average velocity.

Sigma space as :mod:`dit_jax.diffusion.flow`: z_s = (1 - s) x0 + s e (s = 1 noise), instantaneous velocity
v = dz/ds = e - x0. For 0 <= r <= t <= 1 the average velocity is

  u(z_t, r, t) = 1 / (t - r) int_r^t v(z_tau, tau) dtau,   so that   z_r = z_t - (t - r) u(z_t, r, t),

and u = v at r = t. Differentiating (t - r) u = int_r^t v in t gives the MeanFlow identity u = v - (t - r) du/dt,
du/dt = v . d_z u + d_t u the total derivative along the path; training regresses u_theta on the stopped
right-hand side. The network is ``u_fn(z, r, t) -> u`` with z (B, H, W, C), r and t (B,), u shaped like z.

Matches the official JAX code (Gsunshine/meanflow ``meanflow.py``, ``MeanFlow.sample_tr`` / ``forward`` /
``solver_step``; defaults from ``configs/default.py``): t, r from two independent logit-normal(-0.4, 1) draws,
sorted; a fixed count int(B * 0.75) of rows (the first ones) gets r = t; one forward pass plus a JVP with tangents
(v, dr = 0, dt = 1); squared error summed over pixels; weight 1 / sg(err + 0.01)^1; mean over the batch. Its
network takes (t, t - r) rather than (r, t): the wiring into a model maps the pair. Guidance (the paper's CFG
velocity) enters only through the ``v`` given to :func:`meanflow_target`.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dit_jax.diffusion import flow

UFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (z (B,H,W,C), r (B,), t (B,)) -> u (B,H,W,C)


def _bcast(t: jax.Array, x: jax.Array) -> jax.Array:
  """(B,) -> (B, 1, ..., 1) against x (B, ...)."""
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def sample_times(key: jax.Array, batch: int, *, t_sampler: str = "logit_normal", loc: float = -0.4,
                 scale: float = 1.0, equal_fraction: float = 0.75) -> tuple[jax.Array, jax.Array]:
  """(t, r), each (batch,) float32 with r <= t: the max and min of two independent draws of
  ``flow.sample_sigmas(t_sampler, loc, scale)`` ('logit_normal', 'uniform' or 'mode'; clipped to [1e-6, 1 - 1e-6]).

  As the official ``sample_tr``, a fixed count int(batch * equal_fraction) of rows, the first ones, gets r = t
  (plain flow matching); not a per-row Bernoulli. The draws are i.i.d., so which rows does not matter.
  """
  if not 0.0 <= equal_fraction <= 1.0:
    raise ValueError(f"equal_fraction must be in [0, 1], got {equal_fraction}")
  key_a, key_b = jax.random.split(key)
  a = flow.sample_sigmas(key_a, (batch,), t_sampler, loc, scale)
  b = flow.sample_sigmas(key_b, (batch,), t_sampler, loc, scale)
  t, r = jnp.maximum(a, b), jnp.minimum(a, b)
  return t, jnp.where(jnp.arange(batch) < int(batch * equal_fraction), t, r)


def meanflow_target(u_fn: UFn, z: jax.Array, v: jax.Array, t: jax.Array, r: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(u, u_tgt), both shaped like z (B, H, W, C): u = u_fn(z, r, t) and the stopped target
  u_tgt = v - (t - r) du/dt, du/dt = jvp of u_fn at (z, r, t) along (v, 0, 1). v (B, H, W, C): the (possibly
  guided) instantaneous velocity at z; t, r (B,). One forward pass and its JVP, as the official code.

  t - r is clipped to [0, 1] as there (a no-op for valid pairs).
  """
  t, r = jnp.asarray(t, z.dtype), jnp.asarray(r, z.dtype)
  if t.shape != (z.shape[0],) or r.shape != t.shape:
    raise ValueError(f"t and r must have shape ({z.shape[0]},), got {t.shape} and {r.shape}")
  u, du_dt = jax.jvp(u_fn, (z, r, t), (v.astype(z.dtype), jnp.zeros_like(r), jnp.ones_like(t)))
  u_tgt = v - _bcast(jnp.clip(t - r, 0.0, 1.0), du_dt) * du_dt
  return u, jax.lax.stop_gradient(u_tgt)


def adaptive_weighted_loss(u: jax.Array, u_tgt: jax.Array, p: float = 1.0, c: float = 0.01) -> jax.Array:
  """Scalar mean over the batch of w * err, err = ||u - u_tgt||^2 summed over all but the batch axis and
  w = 1 / sg(err + c)^p (p = 0: plain summed MSE; p = 1: roughly a relative error). u, u_tgt (B, ...)."""
  if u.shape != u_tgt.shape:
    raise ValueError(f"u and u_tgt shapes differ: {u.shape} vs {u_tgt.shape}")
  err = jnp.sum((u - u_tgt) ** 2, axis=tuple(range(1, u.ndim)))
  return jnp.mean(err / jax.lax.stop_gradient((err + c) ** p))


def meanflow_loss(u_fn: UFn, x0: jax.Array, noise: jax.Array, key: jax.Array, *, t_sampler: str = "logit_normal",
                  loc: float = -0.4, scale: float = 1.0, equal_fraction: float = 0.75, p: float = 1.0,
                  c: float = 0.01) -> jax.Array:
  """Scalar MeanFlow loss of clean x0 and noise e (B, H, W, C): (t, r) from :func:`sample_times`,
  z_t = (1 - t) x0 + t e, v = e - x0, then :func:`meanflow_target` and :func:`adaptive_weighted_loss`."""
  if x0.shape != noise.shape:
    raise ValueError(f"x0 and noise shapes differ: {x0.shape} vs {noise.shape}")
  t, r = sample_times(key, x0.shape[0], t_sampler=t_sampler, loc=loc, scale=scale, equal_fraction=equal_fraction)
  z = flow.interpolate(x0, noise, t).astype(x0.dtype)
  u, u_tgt = meanflow_target(u_fn, z, flow.velocity_target(x0, noise), t, r)
  return adaptive_weighted_loss(u, u_tgt, p, c)


def sample_steps(u_fn: UFn, noise: jax.Array, steps: int = 1) -> jax.Array:
  """x0 (B, H, W, C) from noise at sigma = 1 in ``steps`` jumps z_r = z_t - (t - r) u(z_t, r, t) over
  linspace(1, 0, steps + 1) (the paper's 1-NFE is steps = 1, its 2-NFE steps = 2); float32 inside, one
  ``lax.scan``, returned in the noise dtype."""
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  sigmas = jnp.linspace(1.0, 0.0, steps + 1, dtype=jnp.float32)
  batch = noise.shape[0]

  def step(z, pair):
    t, r = (jnp.full((batch,), s, jnp.float32) for s in pair)
    return z - (pair[0] - pair[1]) * u_fn(z, r, t).astype(jnp.float32), None

  z, _ = jax.lax.scan(step, noise.astype(jnp.float32), (sigmas[:-1], sigmas[1:]))
  return z.astype(noise.dtype)
