"""LADD discriminator side (dit_jax.distill.ladd): head shapes and conditioning, loss values and gradient signs, the
approximate R1, a discriminator that learns to separate toy features, and the time samplers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dit_jax.distill import ladd

B, H, W, D = 4, 4, 4, 32
HEAD = dict(channels=16, cmap_dim=8, embed_dim=16, groups=4)


def _features(seed, n=2, mean=0.0):
  """n maps (B, T, D) ~ N(mean, 1), drawn by numpy (eager 3-D threefry draws compile slowly on XLA:CPU)."""
  rng = np.random.default_rng(seed)
  return [jnp.asarray(mean + rng.standard_normal((B, H * W, D)), jnp.float32) for _ in range(n)]


@pytest.mark.parametrize("mode", ["labels", "pooled", "none"])
def test_shapes_and_conditioning(mode):
  kw = {"labels": dict(num_classes=10), "pooled": dict(cond_dim=12), "none": {}}[mode]
  disc = ladd.Discriminator(D, (1, 3), nnx.Rngs(0), **HEAD, **kw)
  disc_fn = nnx.jit(lambda f, t, c: disc(f, t, c))  # one compile instead of many eager ops
  cond = {"labels": jnp.array([0, 3, 9, 10]), "pooled": jnp.ones((B, 12)), "none": None}[mode]
  t_hat = jnp.linspace(0.1, 0.9, B)
  feats = _features(1)
  out = disc_fn(feats, t_hat, cond)
  assert [o.shape for o in out] == [(B, H, W)] * 2 and all(o.dtype == jnp.float32 for o in out)
  assert all(np.isfinite(np.asarray(o)).all() for o in out)
  if mode != "none":  # the logits depend on the condition and on t̂
    other = {"labels": jnp.array([1, 4, 8, 2]), "pooled": -jnp.ones((B, 12))}[mode]
    assert not np.allclose(out[0], disc_fn(feats, t_hat, other)[0])
  assert not np.allclose(out[0], disc_fn(feats, t_hat[::-1], cond)[0])
  rect = ladd.DiscriminatorHead(D, nnx.Rngs(0), **HEAD, **kw)(jnp.ones((B, 8, D)), t_hat, cond, grid=(2, 4))
  assert rect.shape == (B, 2, 4)


def test_logical_axis_names():
  disc = ladd.Discriminator(D, (0,), nnx.Rngs(0), **HEAD, num_classes=10)
  specs = nnx.get_partition_spec(nnx.state(disc, nnx.Param))
  assert tuple(specs["heads"][0]["conv_in"]["kernel"].value) == (None, None, "embed", None)
  assert tuple(specs["heads"][0]["y_embedder"]["embedding"].value) == (None, "embed")


def test_bad_inputs():
  head = ladd.DiscriminatorHead(D, nnx.Rngs(0), **HEAD, num_classes=10)
  t_hat = jnp.full((B,), 0.5)
  with pytest.raises(ValueError, match="square grid"):
    head(jnp.ones((B, 8, D)), t_hat, jnp.zeros((B,), int))
  with pytest.raises(ValueError, match="int labels"):
    head(jnp.ones((B, 16, D)), t_hat, jnp.ones((B, 12)))
  with pytest.raises(ValueError, match="not both"):
    ladd.DiscriminatorHead(D, nnx.Rngs(0), **HEAD, num_classes=10, cond_dim=12)
  with pytest.raises(ValueError, match="feature maps"):
    ladd.Discriminator(D, (1, 2), nnx.Rngs(0), **HEAD)(_features(0, 1), t_hat)
  with pytest.raises(ValueError, match="not one of"):
    ladd.d_loss(jnp.ones(2), jnp.ones(2), loss="wgan")


def test_loss_values_and_signs():
  real, fake = jnp.array([1.0, 2.0, 5.0]), jnp.array([-1.0, -3.0, -1.5])
  assert float(ladd.hinge_d_loss(real, fake)) == 0.0
  # two heads sum: head 2 has mean(relu(1 - [0, 0.5])) = 0.75 and mean(relu(1 + [0, 1])) = 1.5
  two = ladd.d_loss([real, jnp.array([0.0, 0.5])], [fake, jnp.array([0.0, 1.0])])
  np.testing.assert_allclose(two, 2.25, rtol=1e-6)
  np.testing.assert_allclose(ladd.g_loss([fake, jnp.array([2.0])]), 5.5 / 3 - 2.0, rtol=1e-6)
  sp = ladd.d_loss(jnp.zeros(3), jnp.zeros(3), loss="softplus")
  np.testing.assert_allclose(sp, 2 * np.log(2), rtol=1e-6)
  g_vals = [float(ladd.g_loss(jnp.full(3, v), loss)) for loss in ladd.LOSSES for v in (-2.0, 0.0, 2.0)]
  assert g_vals[0] > g_vals[1] > g_vals[2] and g_vals[3] > g_vals[4] > g_vals[5]
  r, f = jnp.array([-1.0, 0.5, 2.0]), jnp.array([-2.0, -0.5, 1.0])
  for loss in ladd.LOSSES:
    gr, gf = jax.grad(lambda a, b: ladd.d_loss(a, b, loss), argnums=(0, 1))(r, f)
    if loss == "hinge":  # zero outside the margins
      np.testing.assert_array_equal(np.sign(gr), [-1, -1, 0])
      np.testing.assert_array_equal(np.sign(gf), [0, 1, 1])
    else:
      assert (gr < 0).all() and (gf > 0).all()
    assert (jax.grad(lambda b: ladd.g_loss(b, loss))(f) < 0).all()


def test_approx_r1():
  disc = ladd.Discriminator(D, (1, 3), nnx.Rngs(0), **HEAD, cond_dim=12)
  t_hat, cond = jnp.full((B,), 0.5), jnp.ones((B, 12))
  d_fn = lambda feats: disc(feats, t_hat, cond)
  feats, key = _features(2), jax.random.key(3)
  assert float(ladd.approx_r1(d_fn, feats, key, sigma=0.0)) == 0.0
  small, large = (float(ladd.approx_r1(d_fn, feats, key, sigma=s)) for s in (0.01, 0.1))
  assert 0 < small < large


def test_discriminator_separates_toy_features():
  """real features have mean +1, fake mean -1: a few Adam steps drive the hinge D loss well down."""
  disc = ladd.Discriminator(D, (0,), nnx.Rngs(0), **HEAD, num_classes=10)
  opt = nnx.Optimizer(disc, optax.adam(1e-2), wrt=nnx.Param)
  labels, t_hat = jnp.arange(B), jnp.full((B,), 0.5)

  @nnx.jit
  def step(disc, opt, real, fake):
    loss_fn = lambda d: ladd.d_loss(d(real, t_hat, labels), d(fake, t_hat, labels))
    loss, grads = nnx.value_and_grad(loss_fn)(disc)
    opt.update(disc, grads)
    return loss

  losses = [float(step(disc, opt, _features(2 * i, 1, 1.0), _features(2 * i + 1, 1, -1.0))) for i in range(12)]
  assert losses[-1] < 0.2 * losses[0], losses


def test_times():
  t = np.asarray(ladd.student_times(jax.random.key(0), 20000))
  values, counts = np.unique(t, return_counts=True)
  np.testing.assert_array_equal(values, [0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(counts / t.size, [0.1, 0.1, 0.1, 0.7], atol=0.015)
  warm = np.asarray(ladd.student_times(jax.random.key(1), 20000, probs=(0, 0, 0.5, 0.5)))
  assert set(np.unique(warm)) == {0.25, 0.5}
  with pytest.raises(ValueError, match="summing to 1"):
    ladd.student_times(jax.random.key(0), 4, probs=(0.5, 0.5))
  r = np.asarray(ladd.renoise_times(jax.random.key(0), 20000))
  assert ((r > 0) & (r < 1)).all()
  np.testing.assert_allclose(np.median(r), 1 / (1 + np.exp(-1.0)), atol=0.01)  # median sigmoid(loc)
  assert (r > 0.5).mean() > 0.8  # skewed to high noise: P(n > -1) = 0.84
