"""AutoencoderKL key tables, layout detection, config inference and export.

Two layouts:

* ``diffusers``: diffusers ``AutoencoderKL`` (``encoder.down_blocks.{i}.resnets.{j}.*``, mid-block attention as
  Linear ``to_q/to_k/to_v/to_out.0``, ``conv_norm_out``).
* ``ldm``: the original CompVis/SD single-file layout (``encoder.down.{i}.block.{j}.*``, ``nin_shortcut``,
  ``mid.attn_1.{norm,q,k,v,proj_out}`` as 1x1 convs, ``norm_out``, decoder levels numbered in reverse:
  ``decoder.up.{n-1-i}`` is diffusers' ``up_blocks.{i}``). SD checkpoints prefix it with ``first_stage_model.``;
  FLUX ``ae.safetensors`` and SD3's ``SDVAE`` do not (:func:`select_vae_tensors` strips the prefix).

Rules are :class:`dit_jax.convert.engine.Rule`; the ops add conv kernels (OIHW <-> HWIO) and 1x1-conv
attention projections (``[:, :, 0, 0].T``). Every op has an exact inverse, so the tables also export.

    tensors = select_vae_tensors(tensors)                 # a full SD single file's first_stage_model.*
    layout = detect_layout(tensors)                       # 'diffusers' | 'ldm'
    cfg = infer_config(tensors, layout, diffusers_config, preset=None)
    vae = to_model(tensors, cfg, layout)                  # strict: every key used, every parameter filled
    tensors = from_model(vae, layout)                     # the exact inverse
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.convert import engine
from dit_jax.convert.engine import (
  MAX_LISTED,
  Path,
  Rule,
  apply_table,
  checked_config,
  config_agrees,
  count_numbered,
  export_table,
  listing,
  need,
  pick_table,
)
from dit_jax.convert.readers import ConversionError
from dit_jax.models.vae import PRESETS, AutoencoderKL, VAEConfig

logger = logging.getLogger("dit_jax")

__all__ = ["CONFIG_CLASSES", "LAYOUTS", "OPS", "detect_layout", "diffusers_table", "from_model", "infer_config", "ldm_table",
           "select_vae_tensors", "to_model"]

LDM_PREFIX = "first_stage_model."
# diffusers classes whose config.json may describe this VAE, and the config fields that must be positive ints.
CONFIG_CLASSES = ("AutoencoderKL",)
_INT_FIELDS = ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups", "sample_size")

# op -> (torch -> jax, jax -> torch); the engine's ops plus conv kernels and 1x1-conv attention projections.
OPS: dict[str, tuple[Callable, Callable]] = {
    **engine.OPS,
    "conv": (lambda a: a.transpose(2, 3, 1, 0), lambda a, cfg: a.transpose(3, 2, 0, 1)),
    "conv1x1_T": (lambda a: a[:, :, 0, 0].T, lambda a, cfg: a.T[:, :, None, None]),
}


def _conv(target: Path, source: str) -> list[Rule]:
  return [Rule(target + ("kernel",), (f"{source}.weight",), "conv"), Rule(target + ("bias",), (f"{source}.bias",))]


def _norm(target: Path, source: str) -> list[Rule]:
  return [Rule(target + ("scale",), (f"{source}.weight",)), Rule(target + ("bias",), (f"{source}.bias",))]


def _proj(target: Path, source: str, op: str) -> list[Rule]:
  return [Rule(target + ("kernel",), (f"{source}.weight",), op), Rule(target + ("bias",), (f"{source}.bias",))]


def _resnet(target: Path, source: str, shortcut: str | None) -> list[Rule]:
  rules = [*_norm(target + ("norm1",), f"{source}.norm1"), *_conv(target + ("conv1",), f"{source}.conv1"),
           *_norm(target + ("norm2",), f"{source}.norm2"), *_conv(target + ("conv2",), f"{source}.conv2")]
  if shortcut:
    rules += _conv(target + ("conv_shortcut",), f"{source}.{shortcut}")
  return rules


# Per-layout source names. Formatters take the level i (diffusers numbering) and n (number of levels).
_NAMES = {
    "diffusers": dict(
        down=lambda i, n: f"encoder.down_blocks.{i}.resnets",
        downsample=lambda i, n: f"encoder.down_blocks.{i}.downsamplers.0.conv",
        up=lambda i, n: f"decoder.up_blocks.{i}.resnets",
        upsample=lambda i, n: f"decoder.up_blocks.{i}.upsamplers.0.conv",
        mid_resnet=lambda part, j: f"{part}.mid_block.resnets.{j}", attn=lambda part: f"{part}.mid_block.attentions.0",
        attn_parts=dict(group_norm="group_norm", to_q="to_q", to_k="to_k", to_v="to_v", to_out="to_out.0"),
        attn_op="T", shortcut="conv_shortcut", norm_out="conv_norm_out"),
    "ldm": dict(
        down=lambda i, n: f"encoder.down.{i}.block", downsample=lambda i, n: f"encoder.down.{i}.downsample.conv",
        up=lambda i, n: f"decoder.up.{n - 1 - i}.block", upsample=lambda i, n: f"decoder.up.{n - 1 - i}.upsample.conv",
        mid_resnet=lambda part, j: f"{part}.mid.block_{j + 1}", attn=lambda part: f"{part}.mid.attn_1",
        attn_parts=dict(group_norm="norm", to_q="q", to_k="k", to_v="v", to_out="proj_out"),
        attn_op="conv1x1_T", shortcut="nin_shortcut", norm_out="norm_out"),
}


def _table(cfg: VAEConfig, layout: str) -> list[Rule]:
  names = _NAMES[layout]
  ch, n, lpb = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
  rules: list[Rule] = []
  for part in ("encoder", "decoder"):
    rules += _conv((part, "conv_in"), f"{part}.conv_in")
    for j in range(2):
      rules += _resnet((part, "mid_block", "resnets", j), names["mid_resnet"](part, j), None)
    if cfg.mid_block_add_attention:
      src, dst = names["attn"](part), (part, "mid_block", "attention")
      parts = names["attn_parts"]
      rules += _norm(dst + ("group_norm",), f"{src}.{parts['group_norm']}")
      for ours in ("to_q", "to_k", "to_v", "to_out"):
        rules += _proj(dst + (ours,), f"{src}.{parts[ours]}", names["attn_op"])
    rules += _norm((part, "conv_norm_out"), f"{part}.{names['norm_out']}")
    rules += _conv((part, "conv_out"), f"{part}.conv_out")
  for i in range(n):  # encoder levels: block i takes ch[i-1] (ch[0] for i = 0) to ch[i]
    for j in range(lpb):
      shortcut = names["shortcut"] if j == 0 and ch[max(i - 1, 0)] != ch[i] else None
      rules += _resnet(("encoder", "down_blocks", i, "resnets", j), f"{names['down'](i, n)}.{j}", shortcut)
    if i < n - 1:
      rules += _conv(("encoder", "down_blocks", i, "downsample", "conv"), names["downsample"](i, n))
  rch = ch[::-1]
  for i in range(n):  # decoder levels, lowest resolution first
    for j in range(lpb + 1):
      shortcut = names["shortcut"] if j == 0 and rch[max(i - 1, 0)] != rch[i] else None
      rules += _resnet(("decoder", "up_blocks", i, "resnets", j), f"{names['up'](i, n)}.{j}", shortcut)
    if i < n - 1:
      rules += _conv(("decoder", "up_blocks", i, "upsample", "conv"), names["upsample"](i, n))
  if cfg.use_quant_conv:
    rules += _conv(("quant_conv",), "quant_conv")
  if cfg.use_post_quant_conv:
    rules += _conv(("post_quant_conv",), "post_quant_conv")
  return rules


def diffusers_table(cfg: VAEConfig) -> list[Rule]:
  """diffusers ``AutoencoderKL`` state dict."""
  return _table(cfg, "diffusers")


def ldm_table(cfg: VAEConfig) -> list[Rule]:
  """CompVis LDM / SD / SD3 / FLUX AutoencoderKL state dict, without the ``first_stage_model.`` prefix."""
  return _table(cfg, "ldm")


LAYOUTS = {"diffusers": diffusers_table, "ldm": ldm_table}
ORIGINAL_LAYOUT = "ldm"  # what export's layout "original" means for this family
FILE_PREFIX: dict[str, str] = {}  # layout -> the key prefix of an exported file


def select_vae_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The VAE's own tensors: a full SD single file's ``first_stage_model.*`` entries with the prefix stripped;
  any other state dict unchanged."""
  if any(k.startswith(LDM_PREFIX) for k in tensors):
    return {k[len(LDM_PREFIX):]: v for k, v in tensors.items() if k.startswith(LDM_PREFIX)}
  return tensors


def detect_layout(tensors: dict[str, np.ndarray]) -> str:
  """'diffusers' or 'ldm', from the key names."""
  if any(k.startswith("encoder.down_blocks.") for k in tensors):
    return "diffusers"
  if any(k.startswith("encoder.down.") for k in tensors):
    return "ldm"
  raise ConversionError(f"not an AutoencoderKL state dict: found neither encoder.down_blocks.* (diffusers) nor "
                        f"encoder.down.* (ldm); keys start with {listing(list(tensors)[:MAX_LISTED])}")



def _count_levels(tensors, pattern: str) -> int:
  """N for keys numbered 0..N-1 by ``pattern`` (a regex with one (\\d+) group)."""
  return count_numbered(tensors, pattern, f"no keys match {pattern} (cannot infer the VAE config)",
                        lambda i, last: f"keys matching {pattern} skip index {i} (not numbered 0..{last})")


def _shape_values(tensors: dict[str, np.ndarray], layout: str) -> dict[str, Any]:
  """Channels, levels, layers per block, latent channels, quant convs and mid attention, from the weights."""
  names = _NAMES[layout]
  down = "encoder.down_blocks" if layout == "diffusers" else "encoder.down"
  inner = "resnets" if layout == "diffusers" else "block"
  n = _count_levels(tensors, rf"{re.escape(down)}\.(\d+)\.")
  lpb = _count_levels(tensors, rf"{re.escape(down)}\.0\.{inner}\.(\d+)\.")
  channels = tuple(int(need(tensors, f"{names['down'](i, n)}.0.conv1.weight", "VAE").shape[0]) for i in range(n))
  conv_in = need(tensors, "encoder.conv_in.weight", "VAE")
  dec_in = need(tensors, "decoder.conv_in.weight", "VAE")
  dec_out = need(tensors, "decoder.conv_out.weight", "VAE")
  return dict(
      in_channels=int(conv_in.shape[1]), out_channels=int(dec_out.shape[0]), latent_channels=int(dec_in.shape[1]),
      block_out_channels=channels, layers_per_block=lpb, use_quant_conv="quant_conv.weight" in tensors,
      use_post_quant_conv="post_quant_conv.weight" in tensors,
      mid_block_add_attention=any(k.startswith(names["attn"]("encoder") + ".") for k in tensors))


def _scale_values(preset: str | None, dcfg: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
  """norm_num_groups / scaling_factor / shift_factor from a preset, then config.json, then ``overrides``."""
  scales: dict[str, Any] = {}
  if preset is not None:
    if preset not in PRESETS:
      raise ConversionError(f"unknown VAE preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    scales.update(norm_num_groups=p.norm_num_groups, scaling_factor=p.scaling_factor, shift_factor=p.shift_factor)
  for key in ("norm_num_groups", "scaling_factor", "shift_factor"):
    if dcfg.get(key) is not None:  # (checked_config made them numbers)
      scales[key] = dcfg[key]
  scales.update({k: v for k, v in overrides.items() if v is not None})
  return scales


def infer_config(tensors: dict[str, np.ndarray], layout: str, diffusers_config: dict[str, Any] | None = None,
                 *, preset: str | None = None, **overrides) -> VAEConfig:
  """VAE hyper-parameters from tensor shapes, plus config.json / a preset for what shapes do not show.

  Shapes give the channels, levels, layers per block, latent channels, quant convs and mid attention.
  ``norm_num_groups`` and the latent ``scaling_factor`` / ``shift_factor`` come from (lowest priority first):
  defaults (32 groups; 0.18215 / 0 for 4 latent channels), ``preset`` ('sdxl', 'sd3', 'flux', ...),
  diffusers' config.json, then ``overrides``. A 16-channel VAE (SD3 or FLUX, whose scales differ) without a
  config, preset or explicit scaling_factor is an error, and so is a config.json of another class, with impossible
  values or contradicting the weights.
  """
  pick_table(LAYOUTS, layout, "VAE")
  dcfg = checked_config(diffusers_config, CONFIG_CLASSES, *_INT_FIELDS, int_lists=("block_out_channels",),
                        numbers=("scaling_factor", "shift_factor"))
  values = _shape_values(tensors, layout)
  config_agrees(dcfg, **values)
  scales = _scale_values(preset, dcfg, overrides)
  if "scaling_factor" not in scales:
    if values["latent_channels"] != 4:
      raise ConversionError(f"a {values['latent_channels']}-channel VAE has no standard latent scale; pass "
                            "preset='sd3'/'flux' or scaling_factor/shift_factor")
    logger.warning("no scaling_factor in the source; assuming 0.18215 (SD 1.x/2.x). Pass preset='sdxl' for SDXL.")
  try:
    return VAEConfig(**{**values, **scales})
  except (TypeError, ValueError) as e:
    raise ConversionError(str(e)) from None


def to_model(tensors: dict[str, np.ndarray], cfg: VAEConfig, layout: str, *, dtype=jnp.float32,
             param_dtype=jnp.float32, allow_nonfinite: bool = False) -> AutoencoderKL:
  """Apply the layout's key table strictly and streaming (:func:`~dit_jax.convert.engine.apply_table`): every
  source key used, every parameter filled, shapes and float dtypes checked, NaN / Inf refused unless
  ``allow_nonfinite``."""
  table = pick_table(LAYOUTS, layout, "VAE")
  abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
  return apply_table(tensors, table(cfg), abstract, cfg, what=f"{layout} VAE", ops=OPS,
                     allow_nonfinite=allow_nonfinite)


def from_model(model: AutoencoderKL, layout: str) -> dict[str, np.ndarray]:
  """The model's parameters as a numpy state dict in the layout's torch key names (inverse of the import)."""
  return export_table(model, pick_table(LAYOUTS, layout, "VAE")(model.config), OPS)
