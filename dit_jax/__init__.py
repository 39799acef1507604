"""dit_jax: Diffusion Transformers (DiT, MMDiT) in JAX / Flax NNX.

Public API:
  load(path, dtype=jnp.float32)  -> NNX model from a checkpoint directory (``model.config``)
  load_vae(path)                 -> the AutoencoderKL of a VAE checkpoint or of a model directory bundling one
  save(model, out_dir)           -> write a checkpoint directory
  sample(model, cond, key, *, method, steps, cfg_scale, negative, skip_layer_guidance, latent_size, ...)
                                 -> final latents (one jitted loop; DiT: class ids, MMDiT: {"context", "pooled"})
  DiT, DiTConfig, dit_config     -> the model, its config and the paper's named configs (CONFIGS)
  MMDiT, MMDiTConfig             -> SD3 / SD3.5 multimodal DiT
"""
from dit_jax.checkpoint import CheckpointError, load, load_vae, save
from dit_jax.diffusion.samplers import sample
from dit_jax.models.dit import CONFIGS, CONVENTIONS, DiT, DiTConfig, dit_config
from dit_jax.models.mmdit import MMDiT, MMDiTConfig

__version__ = "0.1.0"
__all__ = ["CONFIGS", "CONVENTIONS", "CheckpointError", "DiT", "DiTConfig", "MMDiT", "MMDiTConfig", "dit_config", "load", "load_vae", "sample", "save"]
