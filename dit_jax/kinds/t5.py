"""The T5 v1.1 text encoder (SD3's ``text_encoder_3``, FLUX's T5-XXL): converted, saved and loaded, never trained or
sampled here."""
from __future__ import annotations

from dit_jax.convert import t5_tables
from dit_jax.kinds.base import Kind
from dit_jax.models.attention import IMPLEMENTATIONS
from dit_jax.models.t5 import T5Encoder, T5EncoderConfig, num_params


class T5EncoderKind(Kind):
  name = "t5_encoder"
  module = T5Encoder
  tables = t5_tables
  config = T5EncoderConfig

  def build(self, config: T5EncoderConfig, *, rngs, dtype, param_dtype, attention_impl: str = "auto",
            remat: str = "none", scan_layers: bool = False) -> T5Encoder:
    """``attention_impl`` is accepted and ignored: T5's biased, unscaled attention always runs as XLA einsums."""
    if remat != "none" or scan_layers:
      raise ValueError("the T5 encoder has no remat / scan_layers options")
    if attention_impl not in IMPLEMENTATIONS:
      raise ValueError(f"attention_impl {attention_impl!r} is not one of {IMPLEMENTATIONS}")
    return T5Encoder(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def describe(self, cfg: T5EncoderConfig) -> str:
    return (f"T5 encoder layers={cfg.num_layers} d_model={cfg.d_model} heads={cfg.num_heads}x{cfg.d_kv} "
            f"d_ff={cfg.d_ff} vocab={cfg.vocab_size} ({num_params(cfg) / 1e9:.2f} B parameters)")
