"""The CLIP text encoder (SD3's CLIP-L / CLIP-G): converted, checkpointed and loaded to condition a diffusion
model on prompts, never trained or sampled here."""
from __future__ import annotations

from dit_jax.convert import clip_tables
from dit_jax.kinds.base import Kind
from dit_jax.models.clip import CLIPTextConfig, CLIPTextModel
from dit_jax.models.layers import check_build_options


class CLIPTextKind(Kind):
  name = "clip_text"
  module = CLIPTextModel
  tables = clip_tables
  config = CLIPTextConfig

  def build(self, config: CLIPTextConfig, *, rngs, dtype, param_dtype, attention_impl: str = "auto",
            remat: str = "none", scan_layers: bool = False) -> CLIPTextModel:
    """The encoder always attends with XLA (a causal mask over at most 77 tokens): ``attention_impl`` is checked
    and otherwise unused."""
    check_build_options(attention_impl, remat)
    if remat != "none" or scan_layers:
      raise ValueError("the CLIP text encoder has no remat / scan_layers options")
    return CLIPTextModel(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def describe(self, cfg: CLIPTextConfig) -> str:
    return (f"CLIP text layers={cfg.num_hidden_layers} width={cfg.hidden_size} heads={cfg.num_attention_heads} "
            f"act={cfg.hidden_act} projection={cfg.projection_dim}")
