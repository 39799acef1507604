"""FLUX.1 [dev] / [schnell]: converted (BFL and diffusers layouts); trained with rectified flow (convention 'flux',
optionally FLUX's resolution-dependent shift) on text-embedding shards or class tokens; sampled from T5 tokens and
a CLIP pooled vector with BFL's or diffusers' schedule, the distilled guidance input (dev) and diffusers' optional
true CFG."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dit_jax.convert import flux_tables
from dit_jax.diffusion import flow
from dit_jax.kinds.base import Kind, SampleSpec
from dit_jax.kinds.mmdit import MMDiTKind, check_text_cond
from dit_jax.models import flux as flux_model
from dit_jax.models.flux import Flux, FluxConfig


DEFAULT_GUIDANCE = 3.5  # FLUX.1 [dev]'s distilled guidance: diffusers' default and BFL's at release
DEFAULT_LATENT = 128  # latent pixels per side: 1024 px, FluxPipeline's default
SAMPLE_METHODS = ("euler", "heun", "dpmpp_2m_sd35")  # the flow solvers that take any sigma schedule


def check_latent_size(cfg: FluxConfig, latent_size) -> tuple[int, int]:
  """(h, w) latent pixels, both even (2x2 packing); default 128 x 128 (1024 px)."""
  if latent_size is None:
    return DEFAULT_LATENT, DEFAULT_LATENT
  try:
    h, w = (int(v) for v in latent_size)
  except (TypeError, ValueError):
    raise ValueError(f"latent_size must be (height, width) in latent pixels, got {latent_size!r}") from None
  if min(h, w) <= 0 or h % 2 or w % 2:
    raise ValueError(f"latent_size {h}x{w} must be positive and even (FLUX packs 2x2 latent pixels per token)")
  return h, w


class FluxKind(Kind):
  name = "flux"
  module = Flux
  tables = flux_tables
  config = FluxConfig
  conditioning = "text"
  batch_ndims = {"image": 4, "context": 3, "pooled": 2}
  train_section = "flux"
  resolution_shift = True

  def stack_blocks(self, cfg: FluxConfig, state):
    return flux_model.stack_blocks(state, cfg)

  def unstack_blocks(self, cfg: FluxConfig, state):
    return flux_model.unstack_blocks(state, cfg)

  def describe(self, cfg: FluxConfig) -> str:
    return (f"FLUX double={cfg.num_layers} single={cfg.num_single_layers} hidden={cfg.hidden_size} "
            f"heads={cfg.num_attention_heads} guidance_embeds={cfg.guidance_embeds} in={cfg.in_channels} "
            f"out={cfg.out_channels} rope={list(cfg.axes_dims_rope)}")

  # Training ----------------------------------------------------------------------------------------------------

  def train_defaults(self) -> ml_collections.ConfigDict:
    """FluxConfig fields (a small FLUX with the real text widths; recipes set their own) plus the training keys:
    sample_size, the square latent side in pixels of example batches; guidance, the distilled-guidance input of a
    guidance_embeds model, or U(lo, hi) per example when guidance_range = (lo, hi) is set."""
    return ml_collections.ConfigDict(dict(
        in_channels=64, out_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=64,
        num_attention_heads=12, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
        axes_dims_rope=(8, 28, 28), theta=10_000, mlp_ratio=4.0, sample_size=32, guidance=3.5, guidance_range=()))

  def model_config(self, config) -> FluxConfig:
    fields = {f.name for f in dataclasses.fields(FluxConfig)}
    return FluxConfig(**{k: v for k, v in config.flux.items() if k in fields})

  def train_checks(self, config) -> list[tuple[bool, str]]:
    f, g = config.flux, tuple(config.flux.guidance_range)
    return [
        (config.objective == "flow" and config.flow.convention == "flux",
         "model.kind 'flux' trains with objective 'flow' and flow.convention 'flux'"),
        (config.data.conditioning in ("text", "class_tokens"),
         f"model.kind 'flux' needs data.conditioning 'text' or 'class_tokens', not {config.data.conditioning!r}"),
        (0.0 <= config.cond_dropout_prob <= 1.0, f"cond_dropout_prob {config.cond_dropout_prob} is not in [0, 1]"),
        (f.sample_size > 0 and f.sample_size % 2 == 0, f"flux.sample_size {f.sample_size} must be positive and even"),
        (f.guidance >= 0, f"flux.guidance {f.guidance} must be >= 0"),
        (not g or (len(g) == 2 and 0 <= g[0] <= g[1]),
         f"flux.guidance_range {list(g)} must be () or (lo, hi) with 0 <= lo <= hi"),
        (not g or f.guidance_embeds, "flux.guidance_range needs flux.guidance_embeds (a guidance-distilled model)"),
        (not config.sample_every_steps or config.sample.method in SAMPLE_METHODS,
         f"FLUX sample grids use one of {', '.join(SAMPLE_METHODS)}, not sample.method {config.sample.method!r}"),
    ]

  def network(self, config, model: Flux, batch, dropout_key):
    """Each example's context and pooled are zeroed together with probability ``cond_dropout_prob``; a
    guidance_embeds model gets ``flux.guidance``, or U(guidance_range) per example."""
    k_drop, k_guidance = jax.random.split(dropout_key)
    b = batch["image"].shape[0]
    keep = jax.random.bernoulli(k_drop, 1.0 - config.cond_dropout_prob, (b,))
    context = jnp.where(keep[:, None, None], batch["context"], 0.0)
    pooled = jnp.where(keep[:, None], batch["pooled"], 0.0)
    guidance = None
    if model.config.guidance_embeds:
      lo, hi = tuple(config.flux.guidance_range) or (config.flux.guidance,) * 2
      guidance = jax.random.uniform(k_guidance, (b,), jnp.float32, lo, hi) if lo < hi else \
          jnp.full((b,), lo, jnp.float32)
    return lambda x, t: model(x, t, context, pooled, guidance).astype(jnp.float32)

  def example_batch(self, config, batch_size: int, context_length: int | None = None):
    """Latents of ``flux.sample_size``; ``context_length`` T5 tokens (default 512, FLUX.1 [dev]'s)."""
    cfg, f32 = self.model_config(config), jnp.float32
    size, length = config.flux.sample_size, context_length or 512
    return {"image": jax.ShapeDtypeStruct((batch_size, size, size, cfg.in_channels // 4), f32),
            "context": jax.ShapeDtypeStruct((batch_size, length, cfg.joint_attention_dim), f32),
            "pooled": jax.ShapeDtypeStruct((batch_size, cfg.pooled_projection_dim), f32)}

  def loader_kwargs(self, config) -> dict[str, int]:
    """The context / pooled widths the loader's conditioning must have."""
    return {"context_dim": config.flux.joint_attention_dim, "pooled_dim": config.flux.pooled_projection_dim}

  def grid_sample_kwargs(self, config) -> dict:
    """Grids of ``flux.sample_size`` latents with the training shift (the resolution's when trained with it)."""
    shift = "resolution" if config.flow.resolution_shift else config.flow.shift
    guidance = {"guidance": config.flux.guidance} if config.flux.guidance_embeds else {}
    return {"latent_size": (config.flux.sample_size,) * 2, "shift": shift, **guidance}

  # Conditioned as an MMDiT: the class-token spec or the text folder; grids from its first rows / labels 0, 1, ...
  conditioning_meta = MMDiTKind.conditioning_meta
  grid_cond = MMDiTKind.grid_cond

  def flops(self, cfg: FluxConfig, batch) -> float:
    """Depends on the batch's latent and context sizes (``image`` (B, H, W, C), ``context`` (B, L, D))."""
    _, h, w, _ = batch["image"].shape
    return flux_model.flops_per_sample(cfg, h, w, batch["context"].shape[1])

  # Sampling ----------------------------------------------------------------------------------------------------

  def check_latent_size(self, cfg: FluxConfig, latent_size) -> tuple[int, int]:
    return check_latent_size(cfg, latent_size)

  def prepare_sample(self, cfg: FluxConfig, cond, *, method, shift, flow_convention, negative=None,
                     skip_layer_guidance=None, latent_size=None, guidance=None, schedule=None) -> SampleSpec:
    """T5 context and CLIP pooled; Euler on the FLUX schedule ('diffusers' or 'reference' = BFL), shifted by
    the resolution's mu when the model is guidance-distilled (dev) and unshifted otherwise (schnell), as both
    references decide; ``shift`` replaces mu by a constant shift, or 'resolution' applies the resolution's mu
    whatever the model (a run trained with ``flow.resolution_shift``). ``guidance`` (dev only, default 3.5) is the
    distilled-guidance input; ``negative`` with cfg_scale > 1 is diffusers' true CFG."""
    method = method or "euler"
    if method not in SAMPLE_METHODS:
      raise ValueError(f"FLUX samples with one of {', '.join(SAMPLE_METHODS)}, not method {method!r}")
    if flow_convention not in (None, "flux"):
      raise ValueError(f"a FLUX model uses the flux flow convention (time = sigma), not {flow_convention!r}")
    if skip_layer_guidance is not None:
      raise ValueError("skip_layer_guidance is for MMDiT models (SD3.5)")
    if schedule not in (None, *flow.FLUX_SCHEDULES):
      raise ValueError(f"unknown FLUX schedule {schedule!r}; choose one of {', '.join(flow.FLUX_SCHEDULES)}")
    if cfg.in_channels != cfg.out_channels:
      raise ValueError(f"this FLUX model takes {cfg.in_channels // 4} input channels for {cfg.out_channels // 4} "
                       "latent ones (Fill / Canny / Depth): its conditioning latents are not sampled here; call the "
                       "model directly with them concatenated to x")
    if cfg.guidance_embeds:
      guidance = DEFAULT_GUIDANCE if guidance is None else guidance
      if not np.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance}")
    elif guidance is not None:
      raise ValueError("guidance is the distilled-guidance input of FLUX.1 [dev]-like models; this model has no "
                       "guidance embedder (schnell-like): use cfg_scale with a negative for true CFG")
    cond, uncond = check_text_cond(cfg, cond, negative)
    h, w = check_latent_size(cfg, latent_size)
    if cfg.guidance_embeds:
      g = np.full((cond["context"].shape[0],), guidance, np.float32)
      cond, uncond = {**cond, "guidance": g}, {**uncond, "guidance": g}
    resolution = shift == "resolution" or (shift is None and cfg.guidance_embeds)
    mu = flow.dynamic_shift_mu(h * w // 4) if resolution else None
    shift = None if resolution else shift
    return SampleSpec(cond=cond, uncond=uncond, latent_shape=(cond["context"].shape[0], h, w, cfg.out_channels // 4),
                      method=method, shift=1.0 if shift is None else shift, flow_convention="flux",
                      schedule=functools.partial(flow.flux_sigmas, mu=mu, shift=shift, flavour=schedule or "diffusers"))

  def sample_network(self, model: Flux, skip_layers: tuple[int, ...] = ()):
    return lambda x, t, c: model(x, t, c["context"], c["pooled"], c.get("guidance"))
