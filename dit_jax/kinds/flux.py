"""FLUX.1 [dev] / [schnell]: built, converted (BFL and diffusers layouts), saved and loaded; training and sampling
are not wired yet, and the kind says so in one line (the base :class:`Kind` defaults)."""
from __future__ import annotations

from dit_jax.convert import flux_tables
from dit_jax.kinds.base import Kind
from dit_jax.models import flux as flux_model
from dit_jax.models.flux import Flux, FluxConfig


class FluxKind(Kind):
  name = "flux"
  module = Flux
  tables = flux_tables
  config = FluxConfig

  def stack_blocks(self, cfg: FluxConfig, state):
    return flux_model.stack_blocks(state, cfg)

  def unstack_blocks(self, cfg: FluxConfig, state):
    return flux_model.unstack_blocks(state, cfg)

  def describe(self, cfg: FluxConfig) -> str:
    return (f"FLUX double={cfg.num_layers} single={cfg.num_single_layers} hidden={cfg.hidden_size} "
            f"heads={cfg.num_attention_heads} guidance_embeds={cfg.guidance_embeds} in={cfg.in_channels} "
            f"out={cfg.out_channels} rope={list(cfg.axes_dims_rope)}")

  def flops(self, cfg: FluxConfig, batch) -> float:
    """Depends on the batch's latent and context sizes (``image`` (B, H, W, C), ``context`` (B, L, D))."""
    _, h, w, _ = batch["image"].shape
    return flux_model.flops_per_sample(cfg, h, w, batch["context"].shape[1])
