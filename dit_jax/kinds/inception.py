"""The FID Inception-v3: converted from pytorch-fid / torch-fidelity files and loaded to compute FID, sFID, IS and
precision / recall features, never trained or sampled here."""
from __future__ import annotations

from dit_jax.convert import inception_tables
from dit_jax.eval.inception import InceptionConfig, InceptionV3
from dit_jax.kinds.base import Kind
from dit_jax.models.layers import check_build_options


class InceptionKind(Kind):
  name = "inception"
  module = InceptionV3
  tables = inception_tables
  config = InceptionConfig

  def build(self, config: InceptionConfig, *, rngs, dtype, param_dtype, attention_impl: str = "auto",
            remat: str = "none", scan_layers: bool = False) -> InceptionV3:
    """The network computes in float32 'highest' whatever ``dtype``; ``attention_impl`` is checked and unused."""
    check_build_options(attention_impl, remat)
    if remat != "none" or scan_layers:
      raise ValueError("the Inception network has no remat / scan_layers options")
    return InceptionV3(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def describe(self, cfg: InceptionConfig) -> str:
    return f"FID Inception-v3 classes={cfg.num_classes} input={cfg.image_size}"
