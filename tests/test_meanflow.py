"""MeanFlow math: the JVP target against finite differences, the exact average velocity of a point-mass flow
(target = v, loss 0, one-step sampling exact), (t, r) sampling as the official sample_tr, the adaptive weight."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax.diffusion import meanflow
from tests.helpers import rel_err

SHAPE = (4, 3, 3, 2)  # B, H, W, C
DIM = 3 * 3 * 2


def _mlp_params(key, hidden=32):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"w1": jax.random.normal(k1, (DIM + 2, hidden)) / np.sqrt(DIM + 2),
          "b1": 0.1 * jax.random.normal(k2, (hidden,)),
          "w2": jax.random.normal(k3, (hidden, DIM)) / np.sqrt(hidden)}


def _mlp_u(params, z, r, t):
  """A nonlinear toy u(z, r, t): a tanh MLP on [flat z, r, t]."""
  h = jnp.concatenate([z.reshape(z.shape[0], -1), r[:, None], t[:, None]], axis=1)
  return (jnp.tanh(h @ params["w1"] + params["b1"]) @ params["w2"]).reshape(z.shape)


def _point_mass_u(x0):
  """Exact average velocity when the data is the single point x0: z_tau = x0 + tau (z_t - x0) / t along the
  flow, so u(z, r, t) = (z - x0) / t for any r (and v = e - x0 on the path)."""
  return lambda z, r, t: (z - x0) / t[:, None, None, None]


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  x0, e = rng.standard_normal((2, *SHAPE)).astype(np.float32)
  return jnp.asarray(x0), jnp.asarray(e)


def test_jvp_target_matches_finite_differences(data):
  x0, e = data
  params = _mlp_params(jax.random.key(1))
  u_fn = lambda z, r, t: _mlp_u(params, z, r, t)
  t = jnp.array([0.9, 0.7, 0.5, 0.35], jnp.float32)
  r = jnp.array([0.1, 0.2, 0.45, 0.0], jnp.float32)
  z, v = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * e, e - x0
  u, u_tgt = meanflow.meanflow_target(u_fn, z, v, t, r)
  np.testing.assert_allclose(u, u_fn(z, r, t), rtol=1e-6, atol=1e-6)
  du_dt = (v - u_tgt) / (t - r)[:, None, None, None]
  # d/d eps u(z + eps v, r, t + eps) by central differences in float64
  with jax.enable_x64(True):
    p64, z64, v64, r64, t64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, z, v, r, t))
    eps = 1e-5
    fd = (_mlp_u(p64, z64 + eps * v64, r64, t64 + eps) - _mlp_u(p64, z64 - eps * v64, r64, t64 - eps)) / (2 * eps)
    fd = np.asarray(fd)
  err = rel_err(du_dt, fd)
  assert err < 1e-5, f"du/dt vs central differences: rel err {err:.2e}"
  err_tgt = rel_err(u_tgt, np.asarray(v) - np.asarray(t - r)[:, None, None, None] * fd)
  assert err_tgt < 1e-5, f"u_tgt vs finite-difference target: rel err {err_tgt:.2e}"


def test_exact_average_velocity_has_zero_loss(data):
  x0, e = data
  u_fn = _point_mass_u(x0)
  t, r = meanflow.sample_times(jax.random.key(2), SHAPE[0], equal_fraction=0.5)
  z, v = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * e, e - x0
  u, u_tgt = meanflow.meanflow_target(u_fn, z, v, t, r)
  err = rel_err(u_tgt, v)
  assert err < 1e-5, f"target vs v on the straight path: rel err {err:.2e}"
  assert rel_err(u, v) < 1e-5
  loss = meanflow.meanflow_loss(u_fn, x0, e, jax.random.key(3))
  assert float(loss) < 1e-9, f"loss of the exact u: {float(loss):.2e}"
  wrong = meanflow.meanflow_loss(lambda z, r, t: 0.9 * u_fn(z, r, t), x0, e, jax.random.key(3))
  assert float(wrong) > 1e-3


def test_sample_times():
  key = jax.random.key(4)
  n = 10_000
  t, r = meanflow.sample_times(key, n)
  t, r = np.asarray(t), np.asarray(r)
  assert t.shape == r.shape == (n,) and t.dtype == np.float32
  assert np.all(r <= t) and np.all((0 < r) & (t < 1))
  equal = r == t
  assert equal.sum() == int(0.75 * n) and equal[:7500].all()  # a fixed count, the first rows, as sample_tr
  # t is the max of two logit-normal(-0.4, 1) draws: P(logit t <= m) = Phi(m + 0.4)^2, median -0.4 + 0.5449
  np.testing.assert_allclose(np.median(np.log(t / (1 - t))), -0.4 + 0.5449, atol=0.05)
  t2, r2 = meanflow.sample_times(key, n)
  np.testing.assert_array_equal(t, t2)
  np.testing.assert_array_equal(r, r2)
  t3, _ = meanflow.sample_times(jax.random.key(5), n)
  assert not np.array_equal(t, t3)
  tu, ru = meanflow.sample_times(key, n, t_sampler="uniform", equal_fraction=0.25)
  assert int((tu == ru).sum()) == 2500 and np.all(ru <= tu)
  np.testing.assert_allclose(np.mean(np.asarray(tu)[2500:]), 2 / 3, atol=0.02)  # E max(U1, U2) = 2/3
  with pytest.raises(ValueError, match="equal_fraction"):
    meanflow.sample_times(key, 4, equal_fraction=1.5)
  with pytest.raises(ValueError, match="unknown sigma sampling"):
    meanflow.sample_times(key, 4, t_sampler="cosine")


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sample_steps_exact(data, steps):
  x0, e = data
  out = meanflow.sample_steps(_point_mass_u(x0), e, steps)
  err = rel_err(out, x0)
  assert err < (1e-7 if steps == 1 else 1e-6), f"{steps} steps: rel err {err:.2e}"
  with pytest.raises(ValueError, match="steps"):
    meanflow.sample_steps(_point_mass_u(x0), e, 0)


def test_adaptive_weighted_loss():
  rng = np.random.default_rng(6)
  u, u_tgt = rng.standard_normal((2, *SHAPE)).astype(np.float32)
  p, c = 0.75, 1e-3
  err = ((u.astype(np.float64) - u_tgt) ** 2).sum(axis=(1, 2, 3))
  manual = np.mean(err / (err + c) ** p)
  loss = meanflow.adaptive_weighted_loss(jnp.asarray(u), jnp.asarray(u_tgt), p, c)
  assert abs(float(loss) - manual) / manual < 1e-6, f"loss {float(loss)} vs manual {manual}"
  # the weight is stopped: d loss / d u = 2 (u - u_tgt) / ((err + c)^p B)
  grad = jax.grad(meanflow.adaptive_weighted_loss)(jnp.asarray(u), jnp.asarray(u_tgt), p, c)
  expected = 2 * (u - u_tgt) / ((err + c) ** p * SHAPE[0])[:, None, None, None]
  assert rel_err(grad, expected) < 1e-5
  with pytest.raises(ValueError, match="shapes differ"):
    meanflow.adaptive_weighted_loss(jnp.asarray(u), jnp.asarray(u_tgt[:2]))


def test_loss_gradient_flows_only_through_u(data):
  x0, e = data
  params = _mlp_params(jax.random.key(7))
  key = jax.random.key(8)
  loss_fn = lambda prm: meanflow.meanflow_loss(lambda z, r, t: _mlp_u(prm, z, r, t), x0, e, key, equal_fraction=0.5)
  grad = jax.grad(loss_fn)(params)
  # the same loss with the target (and weight) computed once outside the differentiated function
  t, r = meanflow.sample_times(key, SHAPE[0], equal_fraction=0.5)
  z, v = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * e, e - x0
  _, u_tgt = meanflow.meanflow_target(lambda z, r, t: _mlp_u(params, z, r, t), z, v, t, r)
  err0 = jnp.sum((_mlp_u(params, z, r, t) - u_tgt) ** 2, axis=(1, 2, 3))
  manual = lambda prm: jnp.mean(jnp.sum((_mlp_u(prm, z, r, t) - u_tgt) ** 2, axis=(1, 2, 3)) / (err0 + 0.01))
  expected = jax.grad(manual)(params)
  np.testing.assert_allclose(loss_fn(params), manual(params), rtol=1e-6)
  for name in params:
    assert rel_err(grad[name], expected[name]) < 1e-5, name
