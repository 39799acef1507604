"""FID and Inception Score while training (``eval_every_steps``, ``config.eval``), on the training devices.

    evaluator = TrainingEvaluator(config, mesh)      # loads the Inception, the reference statistics, the VAE
    evaluator(ema_model)                             # {'FID-10K': ..., 'IS-10K': ...}

Every evaluation samples the same ``eval.num_samples`` examples: batch i is conditioned on rows i B, ..., i B + B - 1
of the kind's fixed sequence (``Kind.grid_cond``: labels cycled over the classes, so class-balanced; text rows;
class tokens) and starts from the noise of key fold_in(key(seed + 1), i), so successive evaluations differ only by
the model. Samples (decoded by ``eval.vae`` for latent data), uint8 quantisation and Inception features stay on the mesh,
sharded over the batch; the Fréchet distance is the on-device eigh one (float32,
``metrics.frechet_distance_of_features_on_device``) against the reference batch's statistics (ADM's ``mu`` /
``sigma``, else those of its images).
The names carry the sample count: FID-10K is not FID-50K. Nothing here touches the training state, its
randomness or the data position, so a resumed run stays bitwise equal to an uninterrupted one.
"""
from __future__ import annotations

import functools
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from dit_jax import kinds
from dit_jax.diffusion.samplers import FLOW_METHODS, VP_METHODS, sample
from dit_jax.eval import evaluator, metrics
from dit_jax.eval.metrics import FeatureStats

logger = logging.getLogger("dit_jax")
POOL3 = 2048


def count_name(n: int) -> str:
  """10000 -> '10K', 50000 -> '50K', 500 -> '500' (the sample count in a metric's name)."""
  return f"{n // 1000}K" if n % 1000 == 0 else str(n)


def eval_checks(config: ml_collections.ConfigDict) -> list[tuple[bool, str]]:
  """(ok, message) pairs for ``eval_every_steps`` / ``config.eval`` (train_config.validate runs them)."""
  e = config.eval
  if not config.eval_every_steps:
    return [(config.eval_every_steps == 0, f"eval_every_steps {config.eval_every_steps} must be >= 0")]
  return [(config.eval_every_steps > 0, f"eval_every_steps {config.eval_every_steps} must be >= 0"),
          (bool(e.reference), "eval_every_steps needs eval.reference, an ADM reference batch (.npz; "
                              "tools/evaluate.py --make-reference writes one)"),
          (e.num_samples >= 2, f"eval.num_samples {e.num_samples} must be at least 2"),
          (e.batch_size >= 0, f"eval.batch_size {e.batch_size} must be >= 0 (0: global_batch_size)"),
          (e.sample.method in (VP_METHODS if config.objective == "vp" else FLOW_METHODS),
           f"eval.sample.method {e.sample.method!r} cannot sample a {config.objective!r} model; one of "
           f"{', '.join(VP_METHODS if config.objective == 'vp' else FLOW_METHODS)}"),
          (e.sample.steps > 0, f"eval.sample.steps {e.sample.steps} must be positive")]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(fn, graphdef, state, x):
  return fn(nnx.merge(graphdef, state), x)


def _on_mesh(module: nnx.Module, mesh: jax.sharding.Mesh, fn):
  """``x -> fn(module, x)`` jitted (one compile per module structure and input shape), the module's state
  replicated on ``mesh`` (inputs sharded over the batch). ``fn``: a module-level function."""
  graphdef, state = nnx.split(module)
  state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
  return lambda x: _apply(fn, graphdef, state, x)


def _inception(model, images):
  return model(images)


def _decode(vae, latents):
  return vae.decode(vae.unscale_latents(latents))


def _to_rgb_uint8(images: jax.Array) -> jax.Array:
  """[-1, 1] (B, H, W, 1 | 3) -> uint8 RGB as sample_ddp.py quantises (grey repeated to three channels)."""
  images = jnp.clip(127.5 * images.astype(jnp.float32) + 128.0, 0, 255).astype(jnp.uint8)
  return jnp.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


_frechet = jax.jit(metrics.frechet_distance_of_features_on_device)


class TrainingEvaluator:
  """FID-N and IS-N of a model's samples against ``config.eval.reference`` (see the module docstring)."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    e = config.eval
    self.config, self.mesh, self.kind = config, mesh, kinds.get(config.model.kind)
    self.num, self.batch = e.num_samples, e.batch_size or config.global_batch_size
    if self.batch % mesh.size:
      raise ValueError(f"eval.batch_size {self.batch} must be divisible by the mesh's {mesh.size} devices")
    channels = self.kind.example_batch(config, 1)["image"].shape[-1]
    inception = evaluator.load_inception(e.inception or None)
    self.features = _on_mesh(inception, mesh, _inception)
    self.decode = None
    if e.vae:
      from dit_jax.checkpoint import load_vae

      vae = load_vae(e.vae)
      if vae.config.latent_channels != channels:
        raise ValueError(f"eval.vae {e.vae} has {vae.config.latent_channels} latent channels, the model "
                         f"{channels}")
      self.decode = _on_mesh(vae, mesh, _decode)
    elif channels not in (1, 3):
      raise ValueError(f"the model makes {channels}-channel latents: set eval.vae to a converted VAE to decode "
                       "them for the Inception")
    pool3 = evaluator.read_pool3_stats(e.reference)
    source = "its stored mu / sigma"
    if pool3 is None:  # no stored statistics: those of the reference images, once
      images = evaluator.read_images(e.reference, "reference batch")
      feats = jnp.concatenate([self._features(images[i:i + self.batch])
                               for i in range(0, len(images), self.batch)])[:len(images)]
      pool3 = FeatureStats.of(multihost_utils.process_allgather(feats, tiled=True))
      source = f"the statistics of its {len(images)} images"
    if pool3.mu.shape != (POOL3,):
      raise ValueError(f"eval.reference {e.reference}: mu has {pool3.mu.shape[0]} features, not pool3's {POOL3}")
    replicated = NamedSharding(mesh, PartitionSpec())
    self.ref_mu, self.ref_sigma = jax.device_put((jnp.float32(pool3.mu), jnp.float32(pool3.sigma)), replicated)
    self.names = {"fid": f"FID-{count_name(self.num)}", "is": f"IS-{count_name(self.num)}"}
    logger.info("evaluating %s and %s every %d steps against %s (%s)", *self.names.values(),
                config.eval_every_steps, pathlib.Path(e.reference).name, source)

  def _features(self, images: np.ndarray) -> jax.Array:
    """Host uint8 (b <= batch, H, W, 3) -> pool3 (batch, 2048) on the mesh (padded to the batch)."""
    pad = self.batch - len(images)
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)]) if pad else images
    sharding = NamedSharding(self.mesh, PartitionSpec(self.mesh.axis_names))
    return self.features(jax.device_put(images, sharding))["pool3"]

  def __call__(self, model: nnx.Module) -> dict[str, float]:
    """Sample ``num_samples`` examples from ``model`` (the EMA model) and score them."""
    start = time.perf_counter()
    s, key = self.config.eval.sample, jax.random.key(self.config.seed + 1)
    pool3, logits = [], []
    for i, begin in enumerate(range(0, self.num, self.batch)):
      cond = self.kind.grid_cond(self.config, model, self.batch, begin)
      latents = sample(model, cond, jax.random.fold_in(key, i), method=s.method, steps=s.steps, cfg_mode=s.cfg_mode,
                       flow_convention=self.config.flow.convention, mesh=self.mesh,
                       **self.kind.guidance_kwargs(self.config, s.cfg_scale),
                       **self.kind.grid_sample_kwargs(self.config))
      images = self.decode(latents) if self.decode is not None else latents
      out = self.features(_to_rgb_uint8(images))
      pool3.append(out["pool3"])
      logits.append(out["logits"])
    fid = float(_frechet(jnp.concatenate(pool3)[:self.num], self.ref_mu, self.ref_sigma))
    logits = multihost_utils.process_allgather(jnp.concatenate(logits)[:self.num], tiled=True)
    scores = {self.names["fid"]: fid, self.names["is"]: metrics.inception_score(logits)}
    logger.info("%s", "  ".join(f"{k} {v:.4f}" for k, v in scores.items()) +
                f"  ({self.num} samples, {time.perf_counter() - start:.0f} s)")
    return scores
