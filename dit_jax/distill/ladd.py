"""Latent adversarial diffusion distillation (LADD, Sauer et al. 2024): the discriminator side.

The frozen teacher sees a renoised student sample x_t̂ = (1 - t̂) x̂0 + t̂ e (or a renoised real latent) and the
token features F_k (B, T, D) of chosen blocks k feed one small head D_k each (StyleGAN-T / ADD / LADD heads):

  tokens (B, h*w, D) -> (B, h, w, D) -> conv3x3 -> GroupNorm -> LeakyReLU(0.2)
    -> residual (x + LeakyReLU(GroupNorm(conv3x3 x))) / sqrt(2) -> conv1x1 to cmap_dim
  logits[b, i, j] = <feat[b, i, j], cmap(c)[b]> / sqrt(cmap_dim)          (projection conditioning, StyleGAN-T)
  c = SiLU(TimestepEmbedder(1000 t̂) + class embedding | Linear(pooled text vector))

Logits stay per position, (B, h, w), as StyleGAN-T keeps one logit per token; the losses below average over all
entries, so per-image logits (B,) work with them too. No spectral norm: FastGen's DiT head (Conv -> GroupNorm ->
LeakyReLU -> Conv) has none and the discriminator is regularised by the approximate R1 of :func:`approx_r1`.

Losses sum over heads (ADD eq. 3): hinge (ADD / LADD) or non-saturating softplus (FastGen ``common_loss.py``).
Time helpers use the flow convention t in [0, 1], t = 1 pure noise.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dit_jax.models.layers import TimestepEmbedder, linear, logical, normal_002

Logits = jax.Array | Sequence[jax.Array]


def _conv_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """xavier-uniform for an HWIO kernel (fans scaled by the kernel area), drawn flat: a 4-D threefry draw
  compiles about 5x slower on XLA:CPU."""
  limit = math.sqrt(6 / (shape[0] * shape[1] * (shape[2] + shape[3])))
  return jax.random.uniform(key, (math.prod(shape),), dtype, -limit, limit).reshape(shape)


def _conv(c_in: int, c_out: int, kernel: int, rngs: nnx.Rngs, *, axes, dtype, param_dtype) -> nnx.Conv:
  """Stride-1 'SAME' conv, xavier-uniform HWIO kernel named (None, None, *axes), zero bias."""
  return nnx.Conv(c_in, c_out, (kernel, kernel), padding="SAME", dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                  kernel_init=_conv_init, kernel_metadata=logical(None, None, *axes), bias_metadata=logical(axes[1]))


def _norm(channels: int, groups: int, rngs: nnx.Rngs, *, dtype, param_dtype) -> nnx.GroupNorm:
  return nnx.GroupNorm(channels, groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                       scale_metadata=logical(None), bias_metadata=logical(None))


def _grid(t: int, grid: tuple[int, int] | None) -> tuple[int, int]:
  if grid is None:
    side = math.isqrt(t)
    if side * side != t:
      raise ValueError(f"{t} tokens are not a square grid; pass grid=(h, w)")
    grid = (side, side)
  if grid[0] * grid[1] != t:
    raise ValueError(f"grid {tuple(grid)} does not hold {t} tokens")
  return tuple(grid)


class DiscriminatorHead(nnx.Module):
  """One teacher block's tokens -> per-position logits: (B, T, D), t̂ (B,), cond -> (B, h, w) float32.

  cond is (B,) int labels (``num_classes`` set; id ``num_classes`` is the null class), (B, cond_dim) pooled vectors
  (``cond_dim`` set), or None when neither is set (conditioned on t̂ only).
  """

  def __init__(self, hidden_size: int, rngs: nnx.Rngs, *, channels: int = 256, cmap_dim: int = 64,
               embed_dim: int = 256, groups: int = 32, num_classes: int | None = None, cond_dim: int | None = None,
               dtype=jnp.float32, param_dtype=jnp.float32):
    if num_classes is not None and cond_dim is not None:
      raise ValueError("DiscriminatorHead takes num_classes (labels) or cond_dim (pooled vectors), not both")
    if channels % groups:
      raise ValueError(f"channels {channels} are not divisible into {groups} groups")
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.num_classes, self.cond_dim, self.cmap_dim, self.dtype = num_classes, cond_dim, cmap_dim, dtype
    self.conv_in = _conv(hidden_size, channels, 3, rngs, axes=("embed", None), **kw)
    self.norm_in = _norm(channels, groups, rngs, **kw)
    self.conv_res = _conv(channels, channels, 3, rngs, axes=(None, None), **kw)
    self.norm_res = _norm(channels, groups, rngs, **kw)
    self.conv_out = _conv(channels, cmap_dim, 1, rngs, axes=(None, None), **kw)
    self.t_embedder = TimestepEmbedder(embed_dim, rngs, **kw)
    self.y_embedder = nnx.data(None)
    if num_classes is not None:
      self.y_embedder = nnx.Embed(num_classes + 1, embed_dim, param_dtype=param_dtype, embedding_init=normal_002,
                                  rngs=rngs, embedding_metadata=logical(None, "embed"))
    elif cond_dim is not None:
      self.y_embedder = linear(cond_dim, embed_dim, rngs, axes=(None, "embed"), **kw)
    self.cmap = linear(embed_dim, cmap_dim, rngs, axes=("embed", None), **kw)

  def embed(self, t_hat: jax.Array, cond: jax.Array | None) -> jax.Array:
    """c = SiLU(t_embedder(1000 t̂) + y_embedder(cond)): (B, embed_dim)."""
    c = self.t_embedder(1000.0 * t_hat)
    if self.num_classes is not None:
      if cond is None or cond.shape != t_hat.shape or not jnp.issubdtype(cond.dtype, jnp.integer):
        raise ValueError(f"DiscriminatorHead with num_classes needs (B,) int labels, got "
                         f"{None if cond is None else (tuple(cond.shape), cond.dtype)}")
      c = c + self.y_embedder(cond).astype(c.dtype)
    elif self.cond_dim is not None:
      if cond is None or cond.shape != (t_hat.shape[0], self.cond_dim):
        raise ValueError(f"DiscriminatorHead with cond_dim needs cond (B, {self.cond_dim}), got "
                         f"{None if cond is None else tuple(cond.shape)}")
      c = c + self.y_embedder(cond.astype(self.dtype))
    elif cond is not None:
      raise ValueError("DiscriminatorHead without num_classes / cond_dim takes cond=None")
    return nnx.silu(c)

  def __call__(self, x: jax.Array, t_hat: jax.Array, cond: jax.Array | None = None,
               grid: tuple[int, int] | None = None) -> jax.Array:
    b, t, d = x.shape
    if t_hat.shape != (b,):
      raise ValueError(f"t_hat must be ({b},), got {tuple(t_hat.shape)}")
    h, w = _grid(t, grid)
    lrelu = lambda v: jax.nn.leaky_relu(v, 0.2)
    cmap = self.cmap(self.embed(t_hat, cond)).astype(jnp.float32)                 # (B, cmap_dim)
    x = x.astype(self.dtype).reshape(b, h, w, d)                                  # (B, h, w, D)
    x = lrelu(self.norm_in(self.conv_in(x)))                                      # (B, h, w, C)
    x = (x + lrelu(self.norm_res(self.conv_res(x)))) / math.sqrt(2)               # (B, h, w, C)
    feat = self.conv_out(x).astype(jnp.float32)                                   # (B, h, w, cmap_dim)
    return jnp.einsum("bhwc,bc->bhw", feat, cmap) / math.sqrt(self.cmap_dim)


class Discriminator(nnx.Module):
  """One :class:`DiscriminatorHead` per teacher block index in ``layers``.

  ``__call__(features, t_hat, cond, grid=None)``: features[k] (B, T, D) are the outputs of block ``layers[k]``;
  returns a list of (B, h, w) logits in the same order. Head keywords (channels, cmap_dim, num_classes, cond_dim,
  ...) pass through ``head_kw``.
  """

  def __init__(self, hidden_size: int, layers: tuple[int, ...], rngs: nnx.Rngs, **head_kw):
    if not layers:
      raise ValueError("Discriminator needs at least one teacher layer index")
    self.layers = tuple(int(i) for i in layers)
    self.heads = nnx.List([DiscriminatorHead(hidden_size, rngs, **head_kw) for _ in self.layers])

  def __call__(self, features: Sequence[jax.Array], t_hat: jax.Array, cond: jax.Array | None = None,
               grid: tuple[int, int] | None = None) -> list[jax.Array]:
    if len(features) != len(self.layers):
      raise ValueError(f"Discriminator got {len(features)} feature maps for layers {self.layers}")
    return [head(f, t_hat, cond, grid) for head, f in zip(self.heads, features)]


# ---------------------------------------------------------------------------------------------------------------
# Losses (pure; logits are one array or a list over heads, each averaged over all its entries, then summed)

LOSSES = ("hinge", "softplus")


def _heads(logits: Logits) -> list[jax.Array]:
  return [jnp.asarray(logits)] if hasattr(logits, "ndim") else [jnp.asarray(x) for x in logits]


def _check(loss: str) -> None:
  if loss not in LOSSES:
    raise ValueError(f"loss {loss!r} is not one of {LOSSES}")


def hinge_d_loss(real_logits: Logits, fake_logits: Logits) -> jax.Array:
  """sum_k mean(relu(1 - D_k(real))) + mean(relu(1 + D_k(fake)))."""
  return sum(jnp.mean(jax.nn.relu(1 - r)) + jnp.mean(jax.nn.relu(1 + f))
             for r, f in zip(_heads(real_logits), _heads(fake_logits), strict=True))


def hinge_g_loss(fake_logits: Logits) -> jax.Array:
  """sum_k -mean(D_k(fake))."""
  return sum(-jnp.mean(f) for f in _heads(fake_logits))


def softplus_d_loss(real_logits: Logits, fake_logits: Logits) -> jax.Array:
  """Non-saturating: sum_k mean(softplus(-D_k(real))) + mean(softplus(D_k(fake)))."""
  return sum(jnp.mean(jax.nn.softplus(-r)) + jnp.mean(jax.nn.softplus(f))
             for r, f in zip(_heads(real_logits), _heads(fake_logits), strict=True))


def softplus_g_loss(fake_logits: Logits) -> jax.Array:
  """Non-saturating: sum_k mean(softplus(-D_k(fake)))."""
  return sum(jnp.mean(jax.nn.softplus(-f)) for f in _heads(fake_logits))


def d_loss(real_logits: Logits, fake_logits: Logits, loss: str = "hinge") -> jax.Array:
  """Discriminator loss, ``loss`` in LOSSES."""
  _check(loss)
  return (hinge_d_loss if loss == "hinge" else softplus_d_loss)(real_logits, fake_logits)


def g_loss(fake_logits: Logits, loss: str = "hinge") -> jax.Array:
  """Generator (student) adversarial loss, ``loss`` in LOSSES."""
  _check(loss)
  return (hinge_g_loss if loss == "hinge" else softplus_g_loss)(fake_logits)


def approx_r1(d_fn: Callable[[list[jax.Array]], Logits], real_features: Sequence[jax.Array], key: jax.Array,
              sigma: float = 0.1) -> jax.Array:
  """Approximate R1 (APT / FastGen LADD): sum_k mean((D_k(F) - D_k(F + sigma n))^2), n ~ N(0, I) per feature map.

  A finite-difference stand-in for ||dD/dF||^2 on real inputs. FastGen perturbs the clean data before the teacher;
  here the noise goes on the head inputs (ADD places R1 on the features), so no second teacher pass is needed.
  Gradients flow through both terms. ``d_fn`` maps a list of (B, T, D) features to logits (one array or a list).
  """
  keys = jax.random.split(key, len(real_features))
  noisy = [f + sigma * jax.random.normal(k, (f.size,), f.dtype).reshape(f.shape)  # flat: see _conv_init
           for f, k in zip(real_features, keys)]
  return sum(jnp.mean(jnp.square(a - b)) for a, b in zip(_heads(d_fn(list(real_features))), _heads(d_fn(noisy)),
                                                         strict=True))


# ---------------------------------------------------------------------------------------------------------------
# Times


def student_times(key: jax.Array, batch: int, times: Sequence[float] = (1.0, 0.75, 0.5, 0.25),
                  probs: Sequence[float] = (0.7, 0.1, 0.1, 0.1)) -> jax.Array:
  """LADD's discrete student timesteps (sigma units, 1 = noise) drawn with ``probs``: (batch,) float32.
  Warm-up phase: probs (0, 0, 0.5, 0.5)."""
  if len(times) != len(probs) or abs(sum(probs) - 1) > 1e-6 or min(probs) < 0:
    raise ValueError(f"probs {tuple(probs)} must be {len(times)} non-negative numbers summing to 1")
  idx = jax.random.choice(key, len(times), (batch,), p=jnp.asarray(probs, jnp.float32))
  return jnp.asarray(times, jnp.float32)[idx]


def renoise_times(key: jax.Array, batch: int, loc: float = 1.0, scale: float = 1.0) -> jax.Array:
  """Renoising times t̂ = sigmoid(loc + scale n), n ~ N(0, 1) (logit-normal, skewed to noise): (batch,) in (0, 1)."""
  return jax.nn.sigmoid(loc + scale * jax.random.normal(key, (batch,), jnp.float32))
