"""MMDiT key tables (diffusers ``SD3Transformer2DModel`` and Stability's single file; SD3 Medium, SD3.5 Medium /
Large) -> :class:`MMDiT`, layout detection, config inference and export.

The JAX model keeps Stability's module names and fused qkv: diffusers' ``to_q/to_k/to_v`` (image stream) and
``add_q_proj/add_k_proj/add_v_proj`` (context stream) are concatenated along torch's output axis, and
``AdaLayerNormContinuous`` projections (``norm_out`` and the last block's ``norm1_context``), stored by diffusers
in (scale, shift) order, are swapped into Stability's (shift, scale). Every op has an exact inverse
(:func:`from_model`). The stored ``pos_embed.pos_embed`` buffer is imported verbatim.

    layout = detect_layout(tensors)                       # 'diffusers' | 'stability'
    cfg = infer_config(tensors, layout, diffusers_config)
    model = to_model(tensors, cfg, layout)                # strict: every key used, every parameter filled
    tensors = from_model(model, layout)                   # the exact inverse (Stability keys without the prefix)
"""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.convert import engine
from dit_jax.convert.engine import (
  Path,
  Rule,
  apply_table,
  checked_config,
  config_agrees,
  count_blocks,
  export_table,
  key_indices,
  listing,
  need,
  pick_table,
)
from dit_jax.convert.readers import ConversionError
from dit_jax.models.mmdit import MMDiT, MMDiTConfig


def _swap_halves(a: np.ndarray) -> np.ndarray:
  first, second = np.split(a, 2, axis=0)
  return np.concatenate([second, first], axis=0)


# op -> (torch -> jax, jax -> torch); the engine's ops plus the (scale, shift) <-> (shift, scale) swaps.
OPS: dict[str, tuple[Callable, Callable]] = {
    **engine.OPS,
    "swapT": (lambda a: _swap_halves(a).T, lambda a, cfg: _swap_halves(a.T)),
    "swap": (_swap_halves, lambda a, cfg: _swap_halves(a)),
}


def _linear(target: Path, source: str, *, swap: bool = False) -> list[Rule]:
  return [Rule(target + ("kernel",), (f"{source}.weight",), "swapT" if swap else "T"),
          Rule(target + ("bias",), (f"{source}.bias",), "swap" if swap else "copy")]


def _fused(target: Path, sources: tuple[str, ...]) -> list[Rule]:
  return [Rule(target + ("kernel",), tuple(f"{s}.weight" for s in sources), "T", "concat"),
          Rule(target + ("bias",), tuple(f"{s}.bias" for s in sources), "copy", "concat")]


def diffusers_table(cfg: MMDiTConfig) -> list[Rule]:
  """diffusers ``SD3Transformer2DModel`` state dict."""
  rules = [
      Rule(("pos_embed",), ("pos_embed.pos_embed",), "batch1"),
      Rule(("x_embedder", "proj", "kernel"), ("pos_embed.proj.weight",), "patch"),
      Rule(("x_embedder", "proj", "bias"), ("pos_embed.proj.bias",)),
      *_linear(("t_embedder", "fc1"), "time_text_embed.timestep_embedder.linear_1"),
      *_linear(("t_embedder", "fc2"), "time_text_embed.timestep_embedder.linear_2"),
      *_linear(("y_embedder", "fc1"), "time_text_embed.text_embedder.linear_1"),
      *_linear(("y_embedder", "fc2"), "time_text_embed.text_embedder.linear_2"),
      *_linear(("context_embedder",), "context_embedder"),
  ]
  for i in range(cfg.num_layers):
    tb, dst = f"transformer_blocks.{i}", ("joint_blocks", i)
    x, ctx = dst + ("x_block",), dst + ("context_block",)
    pre_only = i == cfg.num_layers - 1
    # image stream
    rules += _linear(x + ("adaLN_modulation",), f"{tb}.norm1.linear")
    rules += _fused(x + ("attn", "qkv"), tuple(f"{tb}.attn.to_{c}" for c in "qkv"))
    rules += _linear(x + ("attn", "proj"), f"{tb}.attn.to_out.0")
    rules += _linear(x + ("mlp", "fc1"), f"{tb}.ff.net.0.proj")
    rules += _linear(x + ("mlp", "fc2"), f"{tb}.ff.net.2")
    if cfg.qk_norm:
      rules += [Rule(x + ("attn", "ln_q", "scale"), (f"{tb}.attn.norm_q.weight",)),
                Rule(x + ("attn", "ln_k", "scale"), (f"{tb}.attn.norm_k.weight",))]
    if i in cfg.dual_attention_layers:
      rules += _fused(x + ("attn2", "qkv"), tuple(f"{tb}.attn2.to_{c}" for c in "qkv"))
      rules += _linear(x + ("attn2", "proj"), f"{tb}.attn2.to_out.0")
      if cfg.qk_norm:
        rules += [Rule(x + ("attn2", "ln_q", "scale"), (f"{tb}.attn2.norm_q.weight",)),
                  Rule(x + ("attn2", "ln_k", "scale"), (f"{tb}.attn2.norm_k.weight",))]
    # context stream
    rules += _linear(ctx + ("adaLN_modulation",), f"{tb}.norm1_context.linear", swap=pre_only)
    rules += _fused(ctx + ("attn", "qkv"), tuple(f"{tb}.attn.add_{c}_proj" for c in "qkv"))
    if cfg.qk_norm:
      rules += [Rule(ctx + ("attn", "ln_q", "scale"), (f"{tb}.attn.norm_added_q.weight",)),
                Rule(ctx + ("attn", "ln_k", "scale"), (f"{tb}.attn.norm_added_k.weight",))]
    if not pre_only:
      rules += _linear(ctx + ("attn", "proj"), f"{tb}.attn.to_add_out")
      rules += _linear(ctx + ("mlp", "fc1"), f"{tb}.ff_context.net.0.proj")
      rules += _linear(ctx + ("mlp", "fc2"), f"{tb}.ff_context.net.2")
  rules += _linear(("final_layer", "adaLN_modulation"), "norm_out.linear", swap=True)
  rules += _linear(("final_layer", "linear"), "proj_out")
  return rules


def stability_table(cfg: MMDiTConfig) -> list[Rule]:
  """Stability's single-file layout (``mmditx.py``; the ``model.diffusion_model.`` prefix stripped, see
  :func:`strip_stability_prefix`): module names are the JAX model's own, qkv fused, (shift, scale) order."""
  rules = [
      Rule(("pos_embed",), ("pos_embed",), "batch1"),
      Rule(("x_embedder", "proj", "kernel"), ("x_embedder.proj.weight",), "patch"),
      Rule(("x_embedder", "proj", "bias"), ("x_embedder.proj.bias",)),
      *_linear(("t_embedder", "fc1"), "t_embedder.mlp.0"),
      *_linear(("t_embedder", "fc2"), "t_embedder.mlp.2"),
      *_linear(("y_embedder", "fc1"), "y_embedder.mlp.0"),
      *_linear(("y_embedder", "fc2"), "y_embedder.mlp.2"),
      *_linear(("context_embedder",), "context_embedder"),
  ]

  def attention(dst: Path, src: str, proj: bool) -> list[Rule]:
    out = _linear(dst + ("qkv",), f"{src}.qkv") + (_linear(dst + ("proj",), f"{src}.proj") if proj else [])
    if cfg.qk_norm:
      out += [Rule(dst + (n, "scale"), (f"{src}.{n}.weight",)) for n in ("ln_q", "ln_k")]
    return out

  for i in range(cfg.num_layers):
    pre_only = i == cfg.num_layers - 1
    for stream in ("x_block", "context_block"):
      src, dst = f"joint_blocks.{i}.{stream}", ("joint_blocks", i, stream)
      full = stream == "x_block" or not pre_only
      rules += _linear(dst + ("adaLN_modulation",), f"{src}.adaLN_modulation.1")
      rules += attention(dst + ("attn",), f"{src}.attn", full)
      if stream == "x_block" and i in cfg.dual_attention_layers:
        rules += attention(dst + ("attn2",), f"{src}.attn2", True)
      if full:
        rules += _linear(dst + ("mlp", "fc1"), f"{src}.mlp.fc1") + _linear(dst + ("mlp", "fc2"), f"{src}.mlp.fc2")
  rules += _linear(("final_layer", "adaLN_modulation"), "final_layer.adaLN_modulation.1")
  rules += _linear(("final_layer", "linear"), "final_layer.linear")
  return rules


LAYOUTS = {"diffusers": diffusers_table, "stability": stability_table}
ORIGINAL_LAYOUT = "stability"  # what export's layout "original" means for this family
STABILITY_PREFIX = "model.diffusion_model."
FILE_PREFIX = {"stability": STABILITY_PREFIX}  # layout -> the key prefix of an exported file
VAE_PREFIX = "first_stage_model."
# Text encoders bundled in Stability / SGM single files; dit_jax does not convert them.
TEXT_ENCODER_PREFIXES = ("text_encoders.", "cond_stage_model.", "conditioner.")


def is_mmdit(tensors: dict[str, np.ndarray]) -> bool:
  """True for an MMDiT state dict in either layout (prefix already stripped): a context embedder and joint
  (Stability) or transformer (diffusers) blocks. DiT, UNet and VAE state dicts have no context embedder."""
  return "context_embedder.weight" in tensors and any(k.startswith(("joint_blocks.", "transformer_blocks."))
                                                      for k in tensors)


def select_mmdit(tensors: dict[str, np.ndarray]) -> tuple[dict, dict, int] | None:
  """Split an MMDiT source into (MMDiT tensors, VAE tensors, number of text-encoder tensors left out), or None
  when it holds no MMDiT.

  A Stability single file keeps the MMDiT under ``model.diffusion_model.``, its VAE under ``first_stage_model.``
  and text encoders under ``text_encoders.`` (SGM: ``cond_stage_model.`` / ``conditioner.``); any other key
  next to a prefixed MMDiT is an error. Without the prefix every other key belongs to the MMDiT (a bare
  ``mmditx`` or diffusers state dict; unknown keys are then reported by the strict key table).
  """
  model, vae, rest, ignored = {}, {}, {}, 0
  for key, value in tensors.items():
    if key.startswith(STABILITY_PREFIX):
      model[key[len(STABILITY_PREFIX):]] = value
    elif key.startswith(VAE_PREFIX):
      vae[key[len(VAE_PREFIX):]] = value
    elif key.startswith(TEXT_ENCODER_PREFIXES):
      ignored += 1
    else:
      rest[key] = value
  if not model:
    model, rest = rest, {}
  if not is_mmdit(model):
    return None
  if rest:
    raise ConversionError(f"unknown top-level keys next to the {STABILITY_PREFIX}* MMDiT: {listing(rest)} "
                          f"(expected only {VAE_PREFIX}* and text encoders {', '.join(TEXT_ENCODER_PREFIXES)})")
  return model, vae, ignored


def strip_stability_prefix(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The MMDiT tensors of a Stability single file (``model.diffusion_model.*``; VAE / text encoders left out).
  A dict without the prefix is returned unchanged."""
  if not any(k.startswith(STABILITY_PREFIX) for k in tensors):
    return tensors
  return {k[len(STABILITY_PREFIX):]: v for k, v in tensors.items() if k.startswith(STABILITY_PREFIX)}


def detect_layout(tensors: dict[str, np.ndarray]) -> str:
  """'diffusers' or 'stability' (prefix already stripped), from the key names."""
  if "pos_embed.proj.weight" in tensors:
    return "diffusers"
  if "x_embedder.proj.weight" in tensors and any(k.startswith("joint_blocks.") for k in tensors):
    return "stability"
  raise ConversionError("not an MMDiT state dict: found neither pos_embed.proj.weight (diffusers) nor "
                        "x_embedder.proj.weight + joint_blocks.* (stability)")


# diffusers classes whose config.json may describe an MMDiT, and the config fields that must be positive ints.
CONFIG_CLASSES = ("SD3Transformer2DModel",)
_INT_FIELDS = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
               "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
               "pos_embed_max_size")


# Per layout: the keys config inference reads (``attn2`` matches the blocks with a second, MMDiT-X attention).
_KEYS = {
    "diffusers": dict(blocks="transformer_blocks", patch="pos_embed.proj.weight", pos="pos_embed.pos_embed",
                      pooled="time_text_embed.text_embedder.linear_1.weight", final="proj_out.weight",
                      norm_q="transformer_blocks.0.attn.norm_q.weight", attn2=r"transformer_blocks\.(\d+)\.attn2\."),
    "stability": dict(blocks="joint_blocks", patch="x_embedder.proj.weight", pos="pos_embed",
                      pooled="y_embedder.mlp.0.weight", final="final_layer.linear.weight",
                      norm_q="joint_blocks.0.x_block.attn.ln_q.weight",
                      attn2=r"joint_blocks\.(\d+)\.x_block\.attn2\."),
}


def _head_dim(hidden: int, depth: int, layout: str, norm_q, dcfg: dict[str, Any], overrides: dict[str, Any]) -> int:
  """The head width: an override, the QK-norm width, config.json, else Stability's rule (heads = depth) for its
  own layout and 64-wide heads (every released SD3) for diffusers' state dicts."""
  for name in ("attention_head_dim", "num_attention_heads"):
    if overrides.get(name) is not None and overrides[name] <= 0:
      raise ConversionError(f"{name}={overrides[name]} is not a positive integer")
  if overrides.get("attention_head_dim"):
    head_dim = int(overrides["attention_head_dim"])
  elif overrides.get("num_attention_heads"):
    head_dim = hidden // int(overrides["num_attention_heads"])
  elif norm_q is not None:
    head_dim = norm_q.shape[0]
  elif dcfg.get("attention_head_dim") is not None:
    head_dim = dcfg["attention_head_dim"]
  elif dcfg.get("num_attention_heads") is not None:
    head_dim = hidden // dcfg["num_attention_heads"]
  else:
    head_dim = 64 if layout == "diffusers" else hidden // depth
  if head_dim <= 0 or hidden % head_dim:
    raise ConversionError(f"cannot split hidden size {hidden} into heads of width {head_dim}; pass "
                          f"num_attention_heads")
  return head_dim


def infer_config(tensors: dict[str, np.ndarray], layout: str, diffusers_config: dict[str, Any] | None = None,
                 **overrides) -> MMDiTConfig:
  """MMDiTConfig from the shapes of a diffusers ``SD3Transformer2DModel`` or Stability single-file state dict
  (a ``model.diffusion_model.`` prefix is stripped first; diffusers' config.json only for ``sample_size``,
  default 128, and, without QK norm, the head split). pre-only last block, QK norm and MMDiT-X layers are
  detected by key presence. A config.json of another class, with impossible values or contradicting the weights
  is an error naming the field."""
  pick_table(LAYOUTS, layout, "MMDiT")
  keys = _KEYS[layout]
  dcfg = checked_config(diffusers_config, CONFIG_CLASSES, *_INT_FIELDS, int_lists=("dual_attention_layers",))
  tensors = strip_stability_prefix(tensors)
  patch = need(tensors, keys["patch"], "MMDiT")
  pos = need(tensors, keys["pos"], "MMDiT")
  pooled = need(tensors, keys["pooled"], "MMDiT")
  context = need(tensors, "context_embedder.weight", "MMDiT")
  final = need(tensors, keys["final"], "MMDiT")
  depth = count_blocks(tensors, keys["blocks"], "joint blocks")
  hidden, in_channels, p = patch.shape[0], patch.shape[1], patch.shape[2]
  grid = int(round(pos.shape[1] ** 0.5))
  if pos.ndim != 3 or grid * grid != pos.shape[1]:
    raise ConversionError(f"pos_embed.pos_embed has shape {pos.shape}, expected (1, P*P, D)")
  out_channels, rem = divmod(final.shape[0], p * p)
  if rem:
    raise ConversionError(f"proj_out has {final.shape[0]} outputs: not a multiple of p*p={p * p}")
  norm_q = tensors.get(keys["norm_q"])
  head_dim = _head_dim(hidden, depth, layout, norm_q, dcfg, overrides)
  values = dict(
      sample_size=dcfg.get("sample_size") or 128, patch_size=p, in_channels=in_channels, num_layers=depth,
      attention_head_dim=head_dim, num_attention_heads=hidden // head_dim,
      joint_attention_dim=context.shape[1], caption_projection_dim=context.shape[0],
      pooled_projection_dim=pooled.shape[1], out_channels=out_channels, pos_embed_max_size=grid,
      qk_norm="rms_norm" if norm_q is not None else None,
      dual_attention_layers=tuple(key_indices(tensors, keys["attn2"])))
  heads_given = overrides.get("attention_head_dim") or overrides.get("num_attention_heads")
  config_agrees(dcfg, nullable=("qk_norm",), **{k: v for k, v in values.items() if k != "sample_size" and not (
      heads_given and k in ("attention_head_dim", "num_attention_heads"))})
  values.update({k: v for k, v in overrides.items()
                 if v is not None and k not in ("attention_head_dim", "num_attention_heads")})
  try:
    return MMDiTConfig(**values)
  except (ValueError, TypeError) as e:
    raise ConversionError(str(e)) from None


def to_model(tensors: dict[str, np.ndarray], cfg: MMDiTConfig, layout: str, *, dtype=jnp.float32,
             param_dtype=jnp.float32, attention_impl: str = "auto", allow_nonfinite: bool = False) -> MMDiT:
  """Apply the layout's key table strictly and streaming (:func:`~dit_jax.convert.engine.apply_table`): every
  source key used, every parameter filled, shapes and float dtypes checked, NaN / Inf refused unless
  ``allow_nonfinite`` (a ``model.diffusion_model.`` prefix is stripped first)."""
  table = pick_table(LAYOUTS, layout, "MMDiT")
  abstract = nnx.eval_shape(lambda: MMDiT(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                          attention_impl=attention_impl))
  return apply_table(strip_stability_prefix(tensors), table(cfg), abstract, cfg, what=f"{layout} MMDiT", ops=OPS,
                     allow_nonfinite=allow_nonfinite)


def from_model(model: MMDiT, layout: str) -> dict[str, np.ndarray]:
  """The exact inverse of :func:`to_model`: the layout's key -> numpy array (Stability keys without the
  ``model.diffusion_model.`` prefix)."""
  return export_table(model, pick_table(LAYOUTS, layout, "MMDiT")(model.config), OPS)
