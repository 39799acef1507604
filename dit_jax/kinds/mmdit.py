"""The SD3-style MMDiT: trained with rectified flow on {"image", "context", "pooled"} batches (text-embedding
shards or class tokens), sampled from text embeddings with CFG against a negative and skip-layer guidance."""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dit_jax import data
from dit_jax.diffusion import flow, vp
from dit_jax.diffusion.guidance import SkipLayerGuidance
from dit_jax.convert import mmdit_tables
from dit_jax.kinds.base import Kind, SampleSpec, check_guidance
from dit_jax.models import mmdit as mmdit_model
from dit_jax.models.mmdit import MMDiT, MMDiTConfig, flops_per_sample

TEXT_KEYS = ("context", "pooled")


def check_text_cond(config: MMDiTConfig, cond, negative=None) -> tuple[dict, dict]:
  """Validate an MMDiT (or FLUX: same field names) condition; returns float32 (cond, uncond) dicts of context
  (B, L, D) and pooled (B, Dp).

  ``negative`` (same keys, 1 or B rows, same L) defaults to zeros of the cond shapes, the empty condition of
  dit_jax's MMDiT training dropout; a one-row negative is broadcast to B rows.
  """
  family = "a FLUX model" if type(config).__name__ == "FluxConfig" else "an MMDiT"
  dims = {"context": (3, config.joint_attention_dim, "(B, L, joint_attention_dim)"),
          "pooled": (2, config.pooled_projection_dim, "(B, pooled_projection_dim)")}

  def arrays(m, what):
    if not isinstance(m, Mapping):
      raise ValueError(f"{family} is conditioned on text embeddings: {what} must be a mapping with keys context "
                       f"(B, L, {config.joint_attention_dim}) and pooled (B, {config.pooled_projection_dim}), "
                       f"not {type(m).__name__} (class labels go to a DiT)")
    missing, extra = [k for k in TEXT_KEYS if k not in m], sorted(set(m) - set(TEXT_KEYS))
    if missing or extra:
      raise ValueError(f"{what} must have exactly the keys context and pooled; "
                       + ", ".join(([f"missing {', '.join(missing)}"] if missing else [])
                                   + ([f"unexpected {', '.join(extra)}"] if extra else [])))
    out = {k: np.asarray(m[k], np.float32) for k in TEXT_KEYS}
    for k, (ndim, dim, shape) in dims.items():
      if out[k].ndim != ndim or out[k].shape[-1] != dim:
        raise ValueError(f"{what} {k} has shape {out[k].shape}, expected {shape} = (..., {dim}) for this model")
    return out

  c = arrays(cond, "cond")
  b = c["context"].shape[0]
  if c["pooled"].shape[0] != b or b == 0:
    raise ValueError(f"cond batch mismatch: context has {b} rows, pooled {c['pooled'].shape[0]}")
  if negative is None:
    return c, {k: np.zeros_like(v) for k, v in c.items()}
  u = arrays(negative, "negative")
  for k, v in u.items():
    if v.shape[0] not in (1, b):
      raise ValueError(f"negative {k} has {v.shape[0]} rows; expected 1 or the batch size {b}")
  if u["context"].shape[1] != c["context"].shape[1]:
    raise ValueError(f"negative context has {u['context'].shape[1]} tokens, cond context "
                     f"{c['context'].shape[1]}; they must match")
  return c, {k: np.broadcast_to(v, (b, *v.shape[1:])).copy() for k, v in u.items()}


def check_latent_size(config: MMDiTConfig, latent_size) -> tuple[int, int]:
  """(h, w) latent pixels for an MMDiT: multiples of the patch size, at most pos_embed_max_size * patch_size."""
  p, limit = config.patch_size, config.pos_embed_max_size * config.patch_size
  if latent_size is None:
    latent_size = (config.sample_size, config.sample_size)
  try:
    h, w = (int(v) for v in latent_size)
  except (TypeError, ValueError):
    raise ValueError(f"latent_size must be (height, width) in latent pixels, got {latent_size!r}") from None
  if min(h, w) <= 0 or h % p or w % p:
    raise ValueError(f"latent_size {h}x{w} must be positive multiples of the patch size {p}")
  if max(h, w) > limit:
    raise ValueError(f"latent_size {h}x{w} exceeds pos_embed_max_size * patch_size = {limit} latent pixels per side")
  return h, w


class MMDiTKind(Kind):
  name = "mmdit"
  module = MMDiT
  tables = mmdit_tables
  config = MMDiTConfig
  conditioning = "text"
  distillable = True
  batch_ndims = {"image": 4, "context": 3, "pooled": 2}
  train_section = "mmdit"

  def stack_blocks(self, cfg: MMDiTConfig, state):
    return mmdit_model.stack_blocks(state, cfg)

  def unstack_blocks(self, cfg: MMDiTConfig, state):
    return mmdit_model.unstack_blocks(state, cfg)

  def describe(self, cfg: MMDiTConfig) -> str:
    p = cfg.pos_embed_max_size
    return (f"MMDiT depth={cfg.num_layers} hidden={cfg.hidden_size} heads={cfg.num_attention_heads} "
            f"qk_norm={cfg.qk_norm} dual_layers={list(cfg.dual_attention_layers)} pos_grid={p}x{p} "
            f"patch={cfg.patch_size} in={cfg.in_channels}")

  def train_defaults(self) -> ml_collections.ConfigDict:
    """MMDiTConfig fields (qk_norm '' = none); the default is a small SD3-shaped model, recipes set their own."""
    return ml_collections.ConfigDict(dict(
        sample_size=32, patch_size=2, in_channels=4, num_layers=12, attention_head_dim=64, num_attention_heads=12,
        joint_attention_dim=768, caption_projection_dim=768, pooled_projection_dim=768, out_channels=4,
        pos_embed_max_size=32, qk_norm="", dual_attention_layers=(), guidance_embed=False, interval_embed=False))

  def model_config(self, config) -> MMDiTConfig:
    return MMDiTConfig(**{**config.mmdit, "qk_norm": config.mmdit.qk_norm or None})

  def train_checks(self, config) -> list[tuple[bool, str]]:
    return [
        (config.objective != "vp" and config.flow.convention == "sd3",
         "model.kind 'mmdit' trains with objective 'flow' and flow.convention 'sd3' (or a distillation objective)"),
        (config.data.conditioning in ("text", "class_tokens"),
         f"model.kind 'mmdit' needs data.conditioning 'text' or 'class_tokens', not {config.data.conditioning!r}"),
        (0.0 <= config.cond_dropout_prob <= 1.0, f"cond_dropout_prob {config.cond_dropout_prob} is not in [0, 1]"),
        (not config.sample_every_steps or config.sample.method not in vp.METHODS,
         f"an MMDiT samples with a flow method (e.g. 'euler'), not sample.method {config.sample.method!r}"),
    ]

  def network(self, config, model: MMDiT, batch, dropout_key, *, uncond: bool = False, **inputs):
    """Each example's context and pooled are zeroed together with probability ``cond_dropout_prob`` (no
    ``dropout_key``: kept; ``uncond``: all zeroed, the sampler's default negative); ``inputs``: guidance /
    interval."""
    keep = jnp.zeros((batch["image"].shape[0],), bool) if uncond else \
        jnp.ones((batch["image"].shape[0],), bool) if dropout_key is None else \
        jax.random.bernoulli(dropout_key, 1.0 - config.cond_dropout_prob, (batch["image"].shape[0],))
    context = jnp.where(keep[:, None, None], batch["context"], 0.0)
    pooled = jnp.where(keep[:, None], batch["pooled"], 0.0)
    return lambda x, t: model(x, t, context, pooled, **inputs).astype(jnp.float32)

  def example_batch(self, config, batch_size: int, context_length: int | None = None):
    """Latents of ``sample_size``; ``context_length`` text tokens (default 333: SD3's 77 CLIP + 256 T5)."""
    cfg, f32 = self.model_config(config), jnp.float32
    size, length = cfg.sample_size, context_length or 333
    return {"image": jax.ShapeDtypeStruct((batch_size, size, size, cfg.in_channels), f32),
            "context": jax.ShapeDtypeStruct((batch_size, length, cfg.joint_attention_dim), f32),
            "pooled": jax.ShapeDtypeStruct((batch_size, cfg.pooled_projection_dim), f32)}

  def flops(self, cfg: MMDiTConfig, batch) -> float:
    """Depends on the batch's latent and context sizes."""
    _, h, w, _ = batch["image"].shape
    return flops_per_sample(cfg, h, w, batch["context"].shape[1])

  def loader_kwargs(self, config) -> dict[str, int]:
    """The context / pooled widths the loader's conditioning must have."""
    return {"context_dim": config.mmdit.joint_attention_dim, "pooled_dim": config.mmdit.pooled_projection_dim}

  def conditioning_meta(self, config, loader=None) -> dict:
    """The class-token table's spec (rebuilt by ``dit_jax.data.class_tokens_from_spec``) or
    {"kind": "text", "text_folder"}."""
    d = config.data
    if d.conditioning == "text":
      return {"kind": "text", "text_folder": str(d.text_folder)}
    source = getattr(loader, "source", None)
    num_classes = getattr(source, "num_classes", None) or getattr(loader, "num_classes", None)
    if num_classes is None:
      num_classes = data.num_classes_of(data.make_source(d))
    return data.ClassTokens(int(num_classes), d.class_token_length, **self.loader_kwargs(config),
                            seed=d.class_token_seed).spec()

  def grid_cond(self, config, model: MMDiT, num: int, start: int = 0) -> dict[str, np.ndarray]:
    """``num`` rows of the text embeddings from row ``start`` (cycled), or the class tokens of labels start,
    start + 1, ..."""
    if config.data.conditioning == "text":
      return data.TextEmbeddings(config.data.text_folder).rows(num, start)
    tokens = data.class_tokens_from_spec(self.conditioning_meta(config))
    return tokens(np.arange(start, start + num) % tokens.num_classes)

  def prepare_sample(self, cfg: MMDiTConfig, cond, *, method, shift, flow_convention, negative=None,
                     skip_layer_guidance=None, latent_size=None, guidance=None, schedule=None) -> SampleSpec:
    """Text embeddings against ``negative`` (default zeros); Euler with the SD3 convention and shift 3 by default."""
    if schedule is not None:
      raise ValueError("schedule is for FLUX models")
    method = method or "euler"
    if method in vp.METHODS:
      raise ValueError(f"an MMDiT is a flow model: method {method!r} is VP-only; use one of "
                       f"{', '.join(flow.METHODS)}")
    if flow_convention not in (None, "sd3"):
      raise ValueError(f"an MMDiT uses the sd3 flow convention, not {flow_convention!r}")
    cond, uncond = check_text_cond(cfg, cond, negative)
    if cfg.guidance_embed or guidance is not None:  # a guidance-distilled MMDiT: g is an input
      g = np.full((cond["context"].shape[0],), check_guidance(cfg, guidance), np.float32)
      cond, uncond = {**cond, "guidance": g}, {**uncond, "guidance": g[:len(uncond["pooled"])]}
    slg = SkipLayerGuidance.parse(skip_layer_guidance)
    if slg is not None and not all(0 <= i < cfg.num_layers for i in slg.layers):
      raise ValueError(f"skip_layer_guidance layers {list(slg.layers)} outside the model's blocks "
                       f"0..{cfg.num_layers - 1}")
    return SampleSpec(cond=cond, uncond=uncond,
                      latent_shape=(cond["context"].shape[0], *check_latent_size(cfg, latent_size), cfg.in_channels),
                      method=method, shift=3.0 if shift is None else shift, flow_convention="sd3", slg=slg)

  def check_latent_size(self, cfg: MMDiTConfig, latent_size) -> tuple[int, int]:
    return check_latent_size(cfg, latent_size)

  def token_features(self, model: MMDiT, batch, x, t, blocks):
    return model.features(x, t, batch["context"], batch["pooled"], blocks)

  def discriminator_condition(self, cfg: MMDiTConfig) -> dict:
    return dict(cond_dim=cfg.pooled_projection_dim)

  def discriminator_input(self, batch):
    return batch["pooled"]

  def sample_network(self, model: MMDiT, skip_layers: tuple[int, ...] = (), **inputs):
    """(x, t, cond) -> output; ``inputs``: the interval of an average-velocity (MeanFlow) step."""
    return lambda x, t, c: model(x, t, c["context"], c["pooled"], skip_layers=skip_layers, guidance=c.get("guidance"),
                                 **inputs)
