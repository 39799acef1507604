"""The class-conditional DiT: trained on {"image", "label"} batches, sampled from (B,) class ids."""
from __future__ import annotations

from collections.abc import Mapping

import jax

import jax.numpy as jnp
import numpy as np

from dit_jax.convert import dit_tables
from dit_jax.kinds.base import Kind, SampleSpec, check_guidance
from dit_jax.models import dit as dit_model
from dit_jax.models.dit import DiT, DiTConfig, dit_config, flops_per_image


def check_labels(labels: np.ndarray, num_classes: int) -> None:
  """One-line ValueErrors for labels that are not (B,) integers in 0..num_classes (the null class)."""
  if labels.ndim != 1:
    raise ValueError(f"class labels must be a 1-D array, got shape {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"class labels must be integers, got {labels.dtype}")
  bad = labels[(labels < 0) | (labels > num_classes)]
  if bad.size:
    raise ValueError(f"class id {int(bad[0])} is out of range 0..{num_classes - 1} (null class {num_classes})")


class DiTKind(Kind):
  name = "dit"
  module = DiT
  tables = dit_tables
  config = DiTConfig
  conditioning = "labels"
  distillable = True
  batch_ndims = {"image": 4, "label": 1}

  def stack_blocks(self, cfg: DiTConfig, state):
    return dit_model.stack_blocks(state, cfg)

  def unstack_blocks(self, cfg: DiTConfig, state):
    return dit_model.unstack_blocks(state, cfg)

  def describe(self, cfg: DiTConfig) -> str:
    return (f"DiT depth={cfg.depth} hidden={cfg.hidden_size} heads={cfg.num_heads} patch={cfg.patch_size} "
            f"input={cfg.input_size} classes={cfg.num_classes} learn_sigma={cfg.learn_sigma}")

  def model_config(self, config) -> DiTConfig:
    """A named config ('DiT-XL/2') with overrides, or every field of ``config.model`` (name '')."""
    m = config.model
    fields = dict(input_size=m.input_size, in_channels=m.in_channels, num_classes=m.num_classes,
                  learn_sigma=m.learn_sigma, class_dropout_prob=m.class_dropout_prob, mlp_ratio=m.mlp_ratio,
                  guidance_embed=m.guidance_embed, interval_embed=m.interval_embed)
    sizes = {k: m[k] for k in ("hidden_size", "depth", "num_heads", "patch_size") if m[k]}
    if m.name:
      return dit_config(m.name, **fields, **sizes)
    return DiTConfig(**fields, **sizes)

  def train_checks(self, config) -> list[tuple[bool, str]]:
    return [
        (config.objective != "vp" or config.model.learn_sigma, "the vp hybrid loss needs model.learn_sigma=True"),
        (config.data.conditioning == "label", "model.kind 'dit' is conditioned on labels (data.conditioning 'label')"),
    ]

  def network(self, config, model: DiT, batch, dropout_key, *, uncond: bool = False, **inputs):
    """Label dropout to the null class with ``class_dropout_prob``, inside the model (no ``dropout_key``: none;
    ``uncond``: every label the null class); ``inputs``: guidance / interval."""
    labels = jnp.full_like(batch["label"], model.config.null_class) if uncond else batch["label"]
    return lambda x, t: model(x, t, labels, dropout_key=dropout_key, **inputs).astype(jnp.float32)

  def example_batch(self, config, batch_size: int, context_length: int | None = None):
    cfg = self.model_config(config)
    return {"image": jax.ShapeDtypeStruct((batch_size, cfg.input_size, cfg.input_size, cfg.in_channels), jnp.float32),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

  def flops(self, cfg: DiTConfig, batch) -> float:
    return flops_per_image(cfg)

  def grid_cond(self, config, model: DiT, num: int, start: int = 0) -> np.ndarray:
    """Labels start, start + 1, ... cycled over the classes (so evaluation batches are class-balanced)."""
    return np.arange(start, start + num) % model.config.num_classes

  def prepare_sample(self, cfg: DiTConfig, cond, *, method, shift, flow_convention, negative=None,
                     skip_layer_guidance=None, latent_size=None, guidance=None, schedule=None) -> SampleSpec:
    """Labels (B,) with the null class as the unconditional branch; VP ('ddpm') by default, or a flow method in
    SiT's convention (shift 1)."""
    for name, value in (("negative", negative), ("skip_layer_guidance", skip_layer_guidance),
                        ("latent_size", latent_size)):
      if value is not None:
        raise ValueError(f"{name} is for MMDiT models; a DiT takes class labels and its fixed input size")
    if schedule is not None:
      raise ValueError("schedule is for FLUX models")
    if isinstance(cond, Mapping):
      raise ValueError("a DiT is conditioned on (B,) class labels, not a text-embedding mapping")
    labels = np.asarray(cond)
    check_labels(labels, cfg.num_classes)
    labels = labels.astype(np.int32)
    cond, uncond = labels, np.full_like(labels, cfg.num_classes)
    if cfg.guidance_embed or guidance is not None:  # a guidance-distilled DiT: g is an input, one call per step
      g = np.full(labels.shape, check_guidance(cfg, guidance), np.float32)
      cond, uncond = {"label": cond, "guidance": g}, {"label": uncond, "guidance": g}
    return SampleSpec(cond=cond, uncond=uncond,
                      latent_shape=(labels.shape[0], cfg.input_size, cfg.input_size, cfg.in_channels),
                      method=method or "ddpm", shift=1.0 if shift is None else shift,
                      flow_convention=flow_convention or "sit")

  def token_features(self, model: DiT, batch, x, t, blocks):
    return model.features(x, t, batch["label"], blocks)

  def discriminator_condition(self, cfg: DiTConfig) -> dict:
    return dict(num_classes=cfg.num_classes)

  def discriminator_input(self, batch):
    return batch["label"]

  def sample_network(self, model: DiT, skip_layers: tuple[int, ...] = (), **inputs):
    """(x, t, cond) -> output; ``inputs``: the interval of an average-velocity (MeanFlow) step."""
    if model.config.guidance_embed:
      return lambda x, t, c: model(x, t, c["label"], guidance=c["guidance"], **inputs)
    return lambda x, t, y: model(x, t, y, **inputs)
