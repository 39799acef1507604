"""The AutoencoderKL: converted and loaded (and bundled with a diffusion model), never trained or sampled here."""
from __future__ import annotations

from dit_jax.convert import vae_tables
from dit_jax.kinds.base import Kind
from dit_jax.models.vae import AutoencoderKL, VAEConfig


class VAEKind(Kind):
  name = "vae"
  module = AutoencoderKL
  tables = vae_tables
  config = VAEConfig

  def build(self, config: VAEConfig, *, rngs, dtype, param_dtype, attention_impl: str = "auto", remat: str = "none",
            scan_layers: bool = False) -> AutoencoderKL:
    if remat != "none" or scan_layers:
      raise ValueError("the VAE has no remat / scan_layers options")
    return AutoencoderKL(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)

  def describe(self, cfg: VAEConfig) -> str:
    return (f"VAE channels={cfg.block_out_channels} latent={cfg.latent_channels} scale={cfg.scaling_factor} "
            f"shift={cfg.shift_factor}")
