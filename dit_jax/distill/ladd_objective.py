"""LADD (Sauer et al. 2024, SD3-Turbo) as a training objective: a student initialised from the teacher learns to
denoise in one step from LADD's few noise levels, judged by a discriminator on the frozen teacher's token features
(:mod:`dit_jax.distill.ladd`: the heads, losses, R1 and time samplers). Two networks train in one step, each with
its own optimizer; the discriminator's parameters and optimizer state live in the TrainState beside the student's.

One step (flow convention: sigma = t, 1 = noise; the model's own convention converted):

    t_s ~ distill.ladd.times with probs             z = (1 - t_s) x0 + t_s e
    x̂0 = z - t_s v_student(z, t_s, c)               (v = noise - x0, no conditioning dropout)
    t̂ ~ sigmoid(renoise_loc + renoise_scale n)      e' fresh noise
    fake = F_teacher((1 - t̂) x̂0 + t̂ e', t̂, c)       real = F_teacher((1 - t̂) x0 + t̂ e', t̂, c)   (blocks `layers`)
    student:        g_loss(D(fake, t̂, c))                      gradients through the frozen teacher into x̂0
    discriminator:  d_loss(D(real), D(sg fake)) + r1_weight * approx_r1(D, real, r1_sigma)

x0 are the loader's latents: real data, or the teacher's samples with ``distill.teacher_data``
(:mod:`dit_jax.distill.teacher_data`, LADD's setting). D is
conditioned on t̂ and the class label (DiT) or the pooled text vector (MMDiT). The discriminator's optimizer is Adam
with betas (d_b1, d_b2) = (0, 0.99) by default, StyleGAN2's and StyleGAN-T's discriminator Adam betas (not
confirmed for LADD), a constant ``d_lr`` and the student's gradient clipping.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from dit_jax import kinds
from dit_jax.diffusion import flow
from dit_jax.distill import ladd


def feature_blocks(config: ml_collections.ConfigDict, depth: int) -> tuple[int, ...]:
  """``distill.ladd.layers``, or for () the middle and last teacher blocks, ((depth - 1) // 2, depth - 1)."""
  given = tuple(int(i) for i in config.distill.ladd.layers)
  return given or tuple(sorted({(depth - 1) // 2, depth - 1}))


def _depth(model_config) -> int:
  return model_config.depth if hasattr(model_config, "depth") else model_config.num_layers


def build_discriminator(config: ml_collections.ConfigDict, model_config, rngs: nnx.Rngs) -> ladd.Discriminator:
  """One head per feature block of the teacher (``model_config``: the student's, the teacher's shape)."""
  l = config.distill.ladd
  dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
  cond = kinds.get(config.model.kind).discriminator_condition(model_config)
  return ladd.Discriminator(model_config.hidden_size, feature_blocks(config, _depth(model_config)), rngs,
                            channels=l.head_channels, cmap_dim=l.cmap_dim, groups=l.head_groups, dtype=dtype,
                            param_dtype=jnp.float32, **cond)


def discriminator_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam(d_lr, betas (d_b1, d_b2)), clipped at ``optimizer.grad_clip`` as the student is."""
  l = config.distill.ladd
  adam = optax.adam(l.d_lr, b1=l.d_b1, b2=l.d_b2, eps=config.optimizer.eps)
  clip = config.optimizer.grad_clip
  return optax.chain(optax.clip_by_global_norm(clip), adam) if clip > 0 else adam


class Draws(NamedTuple):
  """One step's randomness: the student's input z at t_s (B,), and the renoising t̂ (B,) and noise e'."""

  t_s: jax.Array
  z: jax.Array
  t_hat: jax.Array
  e: jax.Array


def draws(config: ml_collections.ConfigDict, x0: jax.Array, key: jax.Array) -> Draws:
  l = config.distill.ladd
  b = x0.shape[0]
  k_s, k_noise, k_hat, k_renoise = jax.random.split(key, 4)
  t_s = ladd.student_times(k_s, b, tuple(l.times), tuple(l.probs))
  z = flow.interpolate(x0, jax.random.normal(k_noise, x0.shape, jnp.float32), t_s)
  t_hat = ladd.renoise_times(k_hat, b, l.renoise_loc, l.renoise_scale)
  return Draws(t_s, z, t_hat, jax.random.normal(k_renoise, x0.shape, jnp.float32))


def student_x0(config: ml_collections.ConfigDict, kind, student: nnx.Module, batch: dict, d: Draws) -> jax.Array:
  """x̂0 = z - t_s v (B, H, W, C): the student's one-step estimate, conditioned without dropout."""
  conv = flow.CONVENTIONS[config.flow.convention]
  v = conv.to_sd3_velocity(kind.network(config, student, batch, None)(d.z, conv.model_time(d.t_s)))
  return d.z - d.t_s[:, None, None, None] * v[..., :d.z.shape[-1]]


def teacher_features(config: ml_collections.ConfigDict, kind, teacher: nnx.Module, batch: dict, x: jax.Array,
                     t_hat: jax.Array) -> list[jax.Array]:
  """The teacher's token features (B, T, D) of the feature blocks at x (B, H, W, C), noise level t̂ (B,)."""
  conv = flow.CONVENTIONS[config.flow.convention]
  blocks = feature_blocks(config, _depth(teacher.config))
  return kind.token_features(teacher, batch, x, conv.model_time(t_hat), blocks)


def _grid(teacher: nnx.Module, x: jax.Array) -> tuple[int, int]:
  p = teacher.config.patch_size
  return x.shape[1] // p, x.shape[2] // p


def generator_loss(config: ml_collections.ConfigDict, kind, student: nnx.Module, teacher: nnx.Module,
                   disc: ladd.Discriminator, batch: dict, d: Draws) -> tuple[jax.Array, list[jax.Array]]:
  """(g_loss(D(fake)), the fake features): x̂0 renoised to t̂, through the frozen teacher and the heads."""
  fake = teacher_features(config, kind, teacher, batch, flow.interpolate(student_x0(config, kind, student, batch, d),
                                                                         d.e, d.t_hat), d.t_hat)
  logits = disc(fake, d.t_hat, kind.discriminator_input(batch), _grid(teacher, batch["image"]))
  return ladd.g_loss(logits, config.distill.ladd.loss), fake


def discriminator_loss(config: ml_collections.ConfigDict, kind, disc: ladd.Discriminator, teacher: nnx.Module,
                       batch: dict, real: list[jax.Array], fake: list[jax.Array], t_hat: jax.Array,
                       key: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """(d_loss + r1_weight r1, (d_loss, r1)) on real and (gradient-stopped) fake features."""
  l = config.distill.ladd
  cond, grid = kind.discriminator_input(batch), _grid(teacher, batch["image"])
  logits = lambda f: disc(f, t_hat, cond, grid)
  d_loss = ladd.d_loss(logits(real), logits([jax.lax.stop_gradient(f) for f in fake]), l.loss)
  r1 = ladd.approx_r1(logits, real, key, l.r1_sigma)
  return d_loss + l.r1_weight * r1, (d_loss, r1)


def ladd_grads(config: ml_collections.ConfigDict, kind, student_of: Callable, params: nnx.State,
               disc_of: Callable, d_params: nnx.State, teacher: nnx.Module, batch: dict, key: jax.Array):
  """(student loss, {"g_loss", "d_loss", "r1"}, student grads, discriminator grads) of one batch; ``student_of`` /
  ``disc_of`` merge parameters into the modules. Both gradients are taken at the step's parameters."""
  k_step, k_r1 = jax.random.split(key)
  d = draws(config, batch["image"], k_step)
  disc = disc_of(d_params)
  (g, fake), g_grads = jax.value_and_grad(
      lambda p: generator_loss(config, kind, student_of(p), teacher, disc, batch, d), has_aux=True)(params)
  real = teacher_features(config, kind, teacher, batch, flow.interpolate(batch["image"], d.e, d.t_hat), d.t_hat)
  real = jax.lax.stop_gradient(real)
  (_, (d_loss, r1)), d_grads = jax.value_and_grad(
      lambda dp: discriminator_loss(config, kind, disc_of(dp), teacher, batch, real, fake, d.t_hat, k_r1),
      has_aux=True)(d_params)
  return g, {"g_loss": g, "d_loss": d_loss, "r1": r1}, g_grads, d_grads


def ladd_loss(config: ml_collections.ConfigDict, kind, student: nnx.Module, teacher: nnx.Module, batch: dict,
              key: jax.Array, discriminator: ladd.Discriminator | None = None) -> jax.Array:
  """The student's adversarial loss against ``discriminator`` (the Trainer updates both networks, see
  :func:`ladd_grads`; same draws for the same key)."""
  if discriminator is None:
    raise ValueError("objective 'ladd' trains a discriminator beside the student: pass discriminator= (the "
                     "Trainer holds it)")
  d = draws(config, batch["image"], jax.random.split(key)[0])
  return generator_loss(config, kind, student, teacher, discriminator, batch, d)[0]


class Auxiliary(NamedTuple):
  """A network an objective trains beside the student, with its own optimizer (LADD's discriminator)."""

  build: Callable  # (config, model_config, rngs) -> nnx.Module (parameters only)
  optimizer: Callable  # config -> optax.GradientTransformation
  grads: Callable  # see ladd_grads


LADD = Auxiliary(build_discriminator, discriminator_optimizer, ladd_grads)
