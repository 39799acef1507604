"""Model definitions: DiT (and later MMDiT, VAE)."""
from dit_jax.models.dit import CONFIGS, CONVENTIONS, DiT, DiTConfig, dit_config

__all__ = ["CONFIGS", "CONVENTIONS", "DiT", "DiTConfig", "dit_config"]
