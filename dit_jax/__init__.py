"""dit_jax: Diffusion Transformers (DiT, MMDiT, FLUX.1) in JAX / Flax NNX.

Public API:
  load(path, dtype=jnp.float32)  -> NNX model from a checkpoint directory (``model.config``)
  load_vae(path)                 -> the AutoencoderKL of a VAE checkpoint or of a model directory bundling one
  save(model, out_dir)           -> write a checkpoint directory
  sample(model, cond, key, *, method, steps, cfg_scale, negative, skip_layer_guidance, latent_size, guidance,
         schedule, ...)          -> final latents (one jitted loop; DiT: class ids, MMDiT / FLUX: {"context",
                                    "pooled"} or prompts with ``encoders``)
  DiT, DiTConfig, dit_config     -> the model, its config and the paper's named configs (CONFIGS)
  MMDiT, MMDiTConfig             -> SD3 / SD3.5 multimodal DiT
  Flux, FluxConfig               -> FLUX.1 [dev] / [schnell] transformer (forward, conversion, sampling from embeddings or prompts)
  load_text_encoders(path)       -> TextEncoders bundled with a model (SD3: CLIP-L, CLIP-G, T5; FLUX: CLIP-L, T5;
                                    with their tokenizers)
  encode_prompt(encoders, prompts, *, negative, family="sd3"|"flux", profile, max_sequence_length, clip_skip)
                                 -> {"context": (B, L, 4096), "pooled": (B, 2048 SD3 / 768 FLUX)} (and the negatives)
"""
from dit_jax.checkpoint import CheckpointError, load, load_vae, save
from dit_jax.diffusion.samplers import sample
from dit_jax.models.dit import CONFIGS, CONVENTIONS, DiT, DiTConfig, dit_config
from dit_jax.models.flux import Flux, FluxConfig
from dit_jax.models.mmdit import MMDiT, MMDiTConfig
from dit_jax.text.conditioning import encode_prompt
from dit_jax.text.encoders import TextEncoders, load_text_encoders

__version__ = "0.1.0"
__all__ = ["CONFIGS", "CONVENTIONS", "CheckpointError", "DiT", "DiTConfig", "Flux", "FluxConfig", "MMDiT", "MMDiTConfig",
           "TextEncoders", "dit_config", "encode_prompt", "load", "load_text_encoders", "load_vae", "sample", "save"]
