"""DiT key tables (facebookresearch ``original`` and ``diffusers``), layout detection, config inference, export.

    layout = detect_layout(tensors)                       # 'original' | 'diffusers'
    cfg = infer_config(tensors, layout, diffusers_config)
    model = to_model(tensors, cfg, layout)                # strict: every key used, every parameter filled
    tensors = from_model(model, layout)                   # the exact inverse
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.convert.engine import (
  MAX_LISTED,
  Path,
  Rule,
  apply_table,
  checked_config,
  config_agrees,
  count_blocks,
  export_table,
  listing,
  need,
  pick_table,
)
from dit_jax.convert.readers import ConversionError
from dit_jax.models.dit import CONVENTIONS, SIZES, DiT, DiTConfig
from dit_jax.models.layers import sincos_2d

logger = logging.getLogger("dit_jax")

__all__ = ["COMPUTED", "CONFIG_CLASSES", "LAYOUTS", "detect_layout", "diffusers_table", "from_model", "infer_config", "original_table",
           "to_model"]


def _linear(target: Path, source: str, merge: str = "one", copies: tuple[str, ...] | None = None) -> list[Rule]:
  """kernel + bias of one Linear; ``copies`` lists prefixes for tied/concat sources instead of ``source``."""
  prefixes = copies or (source,)
  return [Rule(target + ("kernel",), tuple(f"{p}.weight" for p in prefixes), "T", merge),
          Rule(target + ("bias",), tuple(f"{p}.bias" for p in prefixes), "copy", merge)]


def original_table(cfg: DiTConfig) -> list[Rule]:
  """facebookresearch/DiT ``models.py`` state dict (the released DiT-XL-2-*.pt layout)."""
  rules = [
      Rule(("pos_embed",), ("pos_embed",), "batch1"),
      Rule(("x_embedder", "proj", "kernel"), ("x_embedder.proj.weight",), "patch"),
      Rule(("x_embedder", "proj", "bias"), ("x_embedder.proj.bias",)),
      *_linear(("t_embedder", "fc1"), "t_embedder.mlp.0"),
      *_linear(("t_embedder", "fc2"), "t_embedder.mlp.2"),
      Rule(("y_embedder", "embedding_table", "embedding"), ("y_embedder.embedding_table.weight",)),
  ]
  for i in range(cfg.depth):
    src, dst = f"blocks.{i}", ("blocks", i)
    rules += _linear(dst + ("attn", "qkv"), f"{src}.attn.qkv")
    rules += _linear(dst + ("attn", "proj"), f"{src}.attn.proj")
    rules += _linear(dst + ("mlp", "fc1"), f"{src}.mlp.fc1")
    rules += _linear(dst + ("mlp", "fc2"), f"{src}.mlp.fc2")
    rules += _linear(dst + ("adaLN_modulation",), f"{src}.adaLN_modulation.1")
  rules += _linear(("final_layer", "adaLN_modulation"), "final_layer.adaLN_modulation.1")
  rules += _linear(("final_layer", "linear"), "final_layer.linear")
  return rules


def diffusers_table(cfg: DiTConfig) -> list[Rule]:
  """diffusers ``DiTTransformer2DModel`` (and legacy ``Transformer2DModel`` ada_norm_zero) state dict.

  diffusers keeps a copy of the timestep and label embedders in every block (``norm1.emb``); the copies are
  tied here and must be identical. ``pos_embed`` is not stored (diffusers recomputes it).
  """
  blocks = [f"transformer_blocks.{i}" for i in range(cfg.depth)]
  emb = [f"{b}.norm1.emb" for b in blocks]
  rules = [
      Rule(("x_embedder", "proj", "kernel"), ("pos_embed.proj.weight",), "patch"),
      Rule(("x_embedder", "proj", "bias"), ("pos_embed.proj.bias",)),
      *_linear(("t_embedder", "fc1"), "", "tied", tuple(f"{e}.timestep_embedder.linear_1" for e in emb)),
      *_linear(("t_embedder", "fc2"), "", "tied", tuple(f"{e}.timestep_embedder.linear_2" for e in emb)),
      Rule(("y_embedder", "embedding_table", "embedding"),
           tuple(f"{e}.class_embedder.embedding_table.weight" for e in emb), "copy", "tied"),
  ]
  for i, b in enumerate(blocks):
    dst = ("blocks", i)
    rules += _linear(dst + ("attn", "qkv"), "", "concat", tuple(f"{b}.attn1.to_{x}" for x in "qkv"))
    rules += _linear(dst + ("attn", "proj"), f"{b}.attn1.to_out.0")
    rules += _linear(dst + ("mlp", "fc1"), f"{b}.ff.net.0.proj")
    rules += _linear(dst + ("mlp", "fc2"), f"{b}.ff.net.2")
    rules += _linear(dst + ("adaLN_modulation",), f"{b}.norm1.linear")
  rules += _linear(("final_layer", "adaLN_modulation"), "proj_out_1")
  rules += _linear(("final_layer", "linear"), "proj_out_2")
  return rules


LAYOUTS = {"original": original_table, "diffusers": diffusers_table}
ORIGINAL_LAYOUT = "original"  # what export's layout "original" means for this family
FILE_PREFIX: dict[str, str] = {}  # layout -> the key prefix of an exported file
# Parameters a layout does not store, computed from the config instead (diffusers rebuilds the sin-cos table).
COMPUTED: dict[str, dict[Path, Callable[[DiTConfig], np.ndarray]]] = {
    "original": {},
    "diffusers": {("pos_embed",): lambda cfg: sincos_2d(cfg.hidden_size, cfg.grid_size, cfg.grid_size)},
}
# Per layout: the keys whose shapes give the config (patch kernel, label table, final linear, first MLP layer)
# and the prefix of the numbered blocks.
_SHAPE_KEYS = {
    "original": ("x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight",
                 "blocks.0.mlp.fc1.weight"),
    "diffusers": ("pos_embed.proj.weight", "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight",
                  "proj_out_2.weight", "transformer_blocks.0.ff.net.0.proj.weight"),
}
_BLOCKS = {"original": "blocks", "diffusers": "transformer_blocks"}
# diffusers classes whose config.json may describe a DiT, and the config fields that must be positive ints.
CONFIG_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
_INT_FIELDS = ("sample_size", "num_attention_heads", "attention_head_dim", "num_layers", "patch_size", "in_channels",
               "out_channels", "num_embeds_ada_norm")
_HEADS_BY_WIDTH = {h: n for _, h, n in SIZES.values()}


def detect_layout(tensors: dict[str, np.ndarray]) -> str:
  """'original' or 'diffusers', from the key names."""
  if "x_embedder.proj.weight" in tensors:
    return "original"
  if "pos_embed.proj.weight" in tensors and any(k.startswith("transformer_blocks.") for k in tensors):
    return "diffusers"
  raise ConversionError(f"not a DiT state dict: found neither x_embedder.proj.weight (original) nor "
                        f"pos_embed.proj.weight + transformer_blocks.* (diffusers); keys start with "
                        f"{listing(list(tensors)[:MAX_LISTED])}")


def _pos_embed_values(tensors: dict[str, np.ndarray], patch: np.ndarray) -> dict[str, Any]:
  """input_size from the stored (1, T, D) sin-cos table of the original layout."""
  pos = need(tensors, "pos_embed")
  grid = int(round(pos.shape[1] ** 0.5))
  if pos.ndim != 3 or grid * grid != pos.shape[1]:
    raise ConversionError(f"pos_embed has shape {pos.shape}, expected (1, T, D) with square T")
  return dict(input_size=grid * patch.shape[2])


def _diffusers_config_values(dcfg: dict[str, Any], hidden: int) -> dict[str, Any]:
  """What diffusers' config.json tells and the shapes do not: sample size, heads (or the head width), MLP
  LayerNorm eps."""
  values: dict[str, Any] = {}
  if dcfg.get("sample_size") is not None:
    values["input_size"] = dcfg["sample_size"]
  if dcfg.get("num_attention_heads") is not None:
    values["num_heads"] = dcfg["num_attention_heads"]
  elif dcfg.get("attention_head_dim") is not None and hidden % dcfg["attention_head_dim"] == 0:
    values["num_heads"] = hidden // dcfg["attention_head_dim"]
  eps = dcfg.get("norm_eps")
  values["mlp_norm_eps"] = float(CONVENTIONS["diffusers"]["mlp_norm_eps"] if eps is None else eps)
  return values


def _shape_values(layout: str, patch, table, final, fc1, depth: int) -> dict[str, Any]:
  """Config values the weights show (with the layout's conventions and the paper's defaults for the rest)."""
  hidden, in_channels, p = patch.shape[0], patch.shape[1], patch.shape[2]
  out_channels, rem = divmod(final.shape[0], p * p)
  if rem or out_channels not in (in_channels, 2 * in_channels):
    raise ConversionError(f"final linear has {final.shape[0]} outputs: not p*p*C or p*p*2C for p={p}, C={in_channels}")
  heads = _HEADS_BY_WIDTH.get(hidden, hidden // 64 if hidden % 64 == 0 else None)
  return dict(CONVENTIONS[layout], patch_size=p, in_channels=in_channels, hidden_size=hidden, depth=depth,
              num_heads=heads, mlp_ratio=fc1.shape[0] / hidden, num_classes=table.shape[0] - 1,
              class_dropout_prob=0.1, learn_sigma=out_channels == 2 * in_channels, input_size=32)


def _label_values(table: np.ndarray, num_classes: int | None) -> dict[str, Any]:
  """num_classes / class_dropout_prob for an explicit ``num_classes``: a table without the null row belongs to a
  model trained without label dropout."""
  if num_classes is None:
    return {}
  if table.shape[0] not in (num_classes, num_classes + 1):
    raise ConversionError(f"label table has {table.shape[0]} rows: not num_classes={num_classes} (+1 null row)")
  return dict(num_classes=num_classes, class_dropout_prob=0.1 if table.shape[0] == num_classes + 1 else 0.0)


def _config_agrees(dcfg: dict[str, Any], values: dict[str, Any], table, heads_given: bool) -> None:
  """config.json against the weights: depth, channels, patch, label rows (diffusers keeps the null row) and, unless
  ``num_heads`` was given, the head split of the hidden size."""
  hidden, heads = values["hidden_size"], values["num_heads"]
  split = {} if heads_given else dict(num_attention_heads=heads, attention_head_dim=hidden // heads)
  config_agrees(dcfg, num_layers=values["depth"], in_channels=values["in_channels"],
                out_channels=values["in_channels"] * (2 if values["learn_sigma"] else 1),
                patch_size=values["patch_size"], num_embeds_ada_norm=table.shape[0] - 1, **split)


def infer_config(tensors: dict[str, np.ndarray], layout: str, diffusers_config: dict[str, Any] | None = None,
                 **overrides) -> DiTConfig:
  """Hyper-parameters from tensor shapes (plus diffusers' config.json where shapes are silent).

  ``num_heads`` is not visible in any shape: it comes from config.json, an override, the paper's sizes
  (384->6, 768->12, 1024->16, 1152->16), or hidden/64. ``input_size`` comes from the stored pos_embed
  (original), config.json's ``sample_size`` (diffusers) or an override, else 32 (256 px). The label table is
  taken to end with the null-class row (class_dropout_prob 0.1, as every released DiT); pass ``num_classes``
  equal to the row count for a model trained without label dropout. A config.json of another class, with
  impossible values or contradicting the weights (depth, channels, patch, classes, heads) is an error.
  """
  pick_table(LAYOUTS, layout, "DiT")
  dcfg = checked_config(diffusers_config, CONFIG_CLASSES, *_INT_FIELDS, numbers=("norm_eps",))
  patch, table, final, fc1 = [need(tensors, key) for key in _SHAPE_KEYS[layout]]
  depth = count_blocks(tensors, _BLOCKS[layout], "transformer blocks")
  if layout == "original":
    stored = _pos_embed_values(tensors, patch)
  else:
    stored = _diffusers_config_values(dcfg, patch.shape[0])
  values = {**_shape_values(layout, patch, table, final, fc1, depth), **stored}
  values.update(_label_values(table, overrides.pop("num_classes", None)))
  values.update({k: v for k, v in overrides.items() if v is not None})
  if values["num_heads"] is None:
    raise ConversionError(f"cannot infer the number of heads for hidden size {patch.shape[0]}; pass --num-heads")
  _config_agrees(dcfg, values, table, overrides.get("num_heads") is not None)
  if layout == "diffusers" and "input_size" not in stored and overrides.get("input_size") is None:
    logger.warning("no sample_size in the source; assuming input_size=32 (256 px). Pass --input-size to change.")
  try:
    return DiTConfig(**values)
  except ValueError as e:
    raise ConversionError(str(e)) from None


def to_model(tensors: dict[str, np.ndarray], cfg: DiTConfig, layout: str, *, dtype=jnp.float32,
             param_dtype=jnp.float32, attention_impl: str = "auto", allow_nonfinite: bool = False) -> DiT:
  """Apply the layout's key table strictly and streaming (:func:`~dit_jax.convert.engine.apply_table`): every
  source key used, every parameter filled, shapes and float dtypes checked, NaN / Inf refused unless
  ``allow_nonfinite``."""
  table = pick_table(LAYOUTS, layout, "DiT")
  abstract = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                        attention_impl=attention_impl))
  return apply_table(tensors, table(cfg), abstract, cfg, what=f"{layout} DiT", computed=COMPUTED[layout],
                     allow_nonfinite=allow_nonfinite)


def from_model(model: DiT, layout: str) -> dict[str, np.ndarray]:
  """The exact inverse of :func:`to_model`: the layout's key -> numpy array (diffusers' tied copies repeated)."""
  return export_table(model, pick_table(LAYOUTS, layout, "DiT")(model.config))
