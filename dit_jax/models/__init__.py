"""Model definitions: DiT, MMDiT (SD3 / SD3.5), the VAE, and the layers they share."""
from dit_jax.models.dit import CONFIGS, CONVENTIONS, DiT, DiTConfig, dit_config

__all__ = ["CONFIGS", "CONVENTIONS", "DiT", "DiTConfig", "dit_config"]
