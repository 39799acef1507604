"""FLUX.1 key tables (BFL single file and diffusers ``FluxTransformer2DModel``) -> :class:`Flux`, layout
detection, config inference and export.

The JAX model keeps BFL's module names: the ``bfl`` table is one-to-one (torch ``[out, in]`` weights transposed).
diffusers' separate ``to_q/to_k/to_v`` (image) and ``add_{q,k,v}_proj`` (text) are concatenated into the fused qkv,
and a single block's ``attn.to_q/to_k/to_v`` + ``proj_mlp`` into BFL's ``linear1``: the engine splits concatenated
sources evenly, so these four (unequal) tensors travel as one virtual key,
``single_transformer_blocks.N.(attn.to_q|attn.to_k|attn.to_v|proj_mlp).weight``, read lazily
(:func:`fuse_single_blocks`) and split again on export. diffusers' ``norm_out.linear`` ((scale, shift), an
``AdaLayerNormContinuous``) is swapped into BFL's (shift, scale); the per-block modulations share BFL's order.

    layout = detect_layout(tensors)                       # 'bfl' | 'diffusers'
    cfg = infer_config(tensors, layout, diffusers_config)
    model = to_model(tensors, cfg, layout)                # strict: every key used, every parameter filled
    tensors = from_model(model, layout)                   # the exact inverse (BFL keys without a prefix)
"""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.convert import engine
from dit_jax.convert.engine import (
  FLOAT_DTYPES,
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
from dit_jax.convert.readers import ConversionError, LazyTensor, materialise
from dit_jax.models.flux import Flux, FluxConfig


def _swap_halves(a: np.ndarray) -> np.ndarray:
  first, second = np.split(a, 2, axis=0)
  return np.concatenate([second, first], axis=0)


# op -> (torch -> jax, jax -> torch); the engine's ops plus the (scale, shift) <-> (shift, scale) swaps.
OPS: dict[str, tuple[Callable, Callable]] = {
    **engine.OPS,
    "swapT": (lambda a: _swap_halves(a).T, lambda a, cfg: _swap_halves(a.T)),
    "swap": (_swap_halves, lambda a, cfg: _swap_halves(a)),
}

SINGLE_PARTS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")  # diffusers' pieces of BFL's linear1


def fused_key(i: int, param: str) -> str:
  """The virtual diffusers key of single block ``i``'s linear1 ``param`` ('weight' | 'bias')."""
  return f"single_transformer_blocks.{i}.({'|'.join(SINGLE_PARTS)}).{param}"


def _linear(target: Path, source: str, *, swap: bool = False) -> list[Rule]:
  return [Rule(target + ("kernel",), (f"{source}.weight",), "swapT" if swap else "T"),
          Rule(target + ("bias",), (f"{source}.bias",), "swap" if swap else "copy")]


def _fused(target: Path, sources: tuple[str, ...]) -> list[Rule]:
  return [Rule(target + ("kernel",), tuple(f"{s}.weight" for s in sources), "T", "concat"),
          Rule(target + ("bias",), tuple(f"{s}.bias" for s in sources), "copy", "concat")]


def _qk_norm(target: Path, query: str, key: str) -> list[Rule]:
  return [Rule(target + ("query_norm", "scale"), (query,)), Rule(target + ("key_norm", "scale"), (key,))]


def bfl_table(cfg: FluxConfig) -> list[Rule]:
  """BFL's single file (``flux1-dev.safetensors``; a ComfyUI ``model.diffusion_model.`` prefix stripped first):
  the JAX model's own module names."""
  rules = [*_linear(("img_in",), "img_in"), *_linear(("txt_in",), "txt_in"),
           *_linear(("time_in", "fc1"), "time_in.in_layer"), *_linear(("time_in", "fc2"), "time_in.out_layer"),
           *_linear(("vector_in", "fc1"), "vector_in.in_layer"), *_linear(("vector_in", "fc2"), "vector_in.out_layer")]
  if cfg.guidance_embeds:
    rules += _linear(("guidance_in", "fc1"), "guidance_in.in_layer")
    rules += _linear(("guidance_in", "fc2"), "guidance_in.out_layer")
  for i in range(cfg.num_layers):
    src, dst = f"double_blocks.{i}", ("double_blocks", i)
    for s in ("img", "txt"):
      rules += _linear(dst + (f"{s}_mod", "lin"), f"{src}.{s}_mod.lin")
      rules += _linear(dst + (f"{s}_attn", "qkv"), f"{src}.{s}_attn.qkv")
      rules += _qk_norm(dst + (f"{s}_attn", "norm"), f"{src}.{s}_attn.norm.query_norm.scale",
                        f"{src}.{s}_attn.norm.key_norm.scale")
      rules += _linear(dst + (f"{s}_attn", "proj"), f"{src}.{s}_attn.proj")
      rules += _linear(dst + (f"{s}_mlp", "fc1"), f"{src}.{s}_mlp.0")
      rules += _linear(dst + (f"{s}_mlp", "fc2"), f"{src}.{s}_mlp.2")
  for i in range(cfg.num_single_layers):
    src, dst = f"single_blocks.{i}", ("single_blocks", i)
    rules += _linear(dst + ("modulation", "lin"), f"{src}.modulation.lin")
    rules += _linear(dst + ("linear1",), f"{src}.linear1") + _linear(dst + ("linear2",), f"{src}.linear2")
    rules += _qk_norm(dst + ("norm",), f"{src}.norm.query_norm.scale", f"{src}.norm.key_norm.scale")
  rules += _linear(("final_layer", "adaLN_modulation"), "final_layer.adaLN_modulation.1")
  rules += _linear(("final_layer", "linear"), "final_layer.linear")
  return rules


def diffusers_table(cfg: FluxConfig) -> list[Rule]:
  """diffusers ``FluxTransformer2DModel`` state dict, the single blocks' linear1 through :func:`fused_key`."""
  emb = "time_text_embed"
  rules = [*_linear(("img_in",), "x_embedder"), *_linear(("txt_in",), "context_embedder"),
           *_linear(("time_in", "fc1"), f"{emb}.timestep_embedder.linear_1"),
           *_linear(("time_in", "fc2"), f"{emb}.timestep_embedder.linear_2"),
           *_linear(("vector_in", "fc1"), f"{emb}.text_embedder.linear_1"),
           *_linear(("vector_in", "fc2"), f"{emb}.text_embedder.linear_2")]
  if cfg.guidance_embeds:
    rules += _linear(("guidance_in", "fc1"), f"{emb}.guidance_embedder.linear_1")
    rules += _linear(("guidance_in", "fc2"), f"{emb}.guidance_embedder.linear_2")
  for i in range(cfg.num_layers):
    tb, dst = f"transformer_blocks.{i}", ("double_blocks", i)
    rules += _linear(dst + ("img_mod", "lin"), f"{tb}.norm1.linear")
    rules += _fused(dst + ("img_attn", "qkv"), tuple(f"{tb}.attn.to_{c}" for c in "qkv"))
    rules += _qk_norm(dst + ("img_attn", "norm"), f"{tb}.attn.norm_q.weight", f"{tb}.attn.norm_k.weight")
    rules += _linear(dst + ("img_attn", "proj"), f"{tb}.attn.to_out.0")
    rules += _linear(dst + ("img_mlp", "fc1"), f"{tb}.ff.net.0.proj")
    rules += _linear(dst + ("img_mlp", "fc2"), f"{tb}.ff.net.2")
    rules += _linear(dst + ("txt_mod", "lin"), f"{tb}.norm1_context.linear")
    rules += _fused(dst + ("txt_attn", "qkv"), tuple(f"{tb}.attn.add_{c}_proj" for c in "qkv"))
    rules += _qk_norm(dst + ("txt_attn", "norm"), f"{tb}.attn.norm_added_q.weight", f"{tb}.attn.norm_added_k.weight")
    rules += _linear(dst + ("txt_attn", "proj"), f"{tb}.attn.to_add_out")
    rules += _linear(dst + ("txt_mlp", "fc1"), f"{tb}.ff_context.net.0.proj")
    rules += _linear(dst + ("txt_mlp", "fc2"), f"{tb}.ff_context.net.2")
  for i in range(cfg.num_single_layers):
    sb, dst = f"single_transformer_blocks.{i}", ("single_blocks", i)
    rules += _linear(dst + ("modulation", "lin"), f"{sb}.norm.linear")
    rules += [Rule(dst + ("linear1", "kernel"), (fused_key(i, "weight"),), "T"),
              Rule(dst + ("linear1", "bias"), (fused_key(i, "bias"),))]
    rules += _qk_norm(dst + ("norm",), f"{sb}.attn.norm_q.weight", f"{sb}.attn.norm_k.weight")
    rules += _linear(dst + ("linear2",), f"{sb}.proj_out")
  rules += _linear(("final_layer", "adaLN_modulation"), "norm_out.linear", swap=True)
  rules += _linear(("final_layer", "linear"), "proj_out")
  return rules


LAYOUTS = {"diffusers": diffusers_table, "bfl": bfl_table}
ORIGINAL_LAYOUT = "bfl"  # what export's layout "original" means for this family
COMFY_PREFIX = "model.diffusion_model."
FILE_PREFIX: dict[str, str] = {}  # layout -> the key prefix of an exported file (BFL files have none)
CONFIG_CLASSES = ("FluxTransformer2DModel",)
_INT_FIELDS = ("patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers", "attention_head_dim",
               "num_attention_heads", "joint_attention_dim", "pooled_projection_dim")


def strip_prefix(tensors: dict) -> dict:
  """The FLUX tensors of a ComfyUI file (``model.diffusion_model.*``, other keys dropped); else unchanged."""
  if not any(k.startswith(COMFY_PREFIX) for k in tensors):
    return tensors
  return {k[len(COMFY_PREFIX):]: v for k, v in tensors.items() if k.startswith(COMFY_PREFIX)}


# Other parts of a ComfyUI checkpoint next to its model.diffusion_model.*: the VAE (bundled), text encoders.
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIXES = ("text_encoders.", "cond_stage_model.", "conditioner.")


def select_flux(tensors: dict) -> tuple[dict, dict, int] | None:
  """Split a FLUX source into (FLUX tensors without a prefix, VAE tensors, number of text-encoder tensors left
  out), or None when it holds no FLUX transformer.

  A ComfyUI file keeps the transformer under ``model.diffusion_model.`` and, in a full checkpoint, the VAE under
  ``first_stage_model.`` and text encoders under ``text_encoders.``; any other key next to a prefixed transformer
  is a one-line ConversionError. Without the prefix every key belongs to the transformer (BFL's single file or a
  diffusers state dict; unknown keys are then reported by the strict key table)."""
  if not any(k.startswith(COMFY_PREFIX) for k in tensors):
    return (tensors, {}, 0) if is_flux(tensors) else None
  model, vae, rest, ignored = {}, {}, [], 0
  for key, value in tensors.items():
    if key.startswith(COMFY_PREFIX):
      model[key[len(COMFY_PREFIX):]] = value
    elif key.startswith(VAE_PREFIX):
      vae[key[len(VAE_PREFIX):]] = value
    elif key.startswith(TEXT_ENCODER_PREFIXES):
      ignored += 1
    else:
      rest.append(key)
  if not is_flux(model):
    return None
  if rest:
    raise ConversionError(f"unknown top-level keys next to the {COMFY_PREFIX}* FLUX transformer: {listing(rest)} "
                          f"(expected only {VAE_PREFIX}* and text encoders {', '.join(TEXT_ENCODER_PREFIXES)})")
  return model, vae, ignored


def is_flux(tensors: dict) -> bool:
  """True for a FLUX transformer state dict in either layout (a ComfyUI prefix allowed)."""
  try:
    detect_layout(tensors)
  except ConversionError:
    return False
  return True


def detect_layout(tensors: dict) -> str:
  """'bfl' or 'diffusers' from the key names (a ComfyUI prefix allowed)."""
  keys = strip_prefix(tensors)
  if "img_in.weight" in keys and any(k.startswith("double_blocks.") for k in keys):
    return "bfl"
  if "x_embedder.weight" in keys and any(k.startswith("single_transformer_blocks.") for k in keys):
    return "diffusers"
  raise ConversionError("not a FLUX state dict: found neither img_in.weight + double_blocks.* (bfl) nor "
                        "x_embedder.weight + single_transformer_blocks.* (diffusers)")


def fuse_single_blocks(tensors: dict) -> dict:
  """A diffusers state dict with each single block's ``attn.to_q/to_k/to_v`` + ``proj_mlp`` weight (bias)
  replaced by one lazy concatenation under :func:`fused_key` (read only when the engine asks for it). A block
  holding only some of the four, or pieces of different widths or non-float dtypes, is a one-line
  ConversionError; a block holding none is left for the engine to report."""
  out, problems = dict(tensors), []
  for i in key_indices(tensors, r"single_transformer_blocks\.(\d+)\."):
    for param in ("weight", "bias"):
      keys = [f"single_transformer_blocks.{i}.{p}.{param}" for p in SINGLE_PARTS]
      present = [k for k in keys if k in tensors]
      if not present:
        continue
      if len(present) < len(keys):
        problems.append(f"missing keys: {listing(set(keys) - set(present))}")
        continue
      parts = [tensors[k] for k in keys]
      not_float = [f"{k} ({np.dtype(p.dtype).name})" for k, p in zip(keys, parts)
                   if np.dtype(p.dtype).name not in FLOAT_DTYPES]
      if not_float:
        problems.append(f"not a float dtype ({'/'.join(FLOAT_DTYPES)}): {listing(not_float)}")
        continue
      if len({tuple(p.shape[1:]) for p in parts}) > 1 or parts[0].ndim == 0:
        problems.append(f"wrong shape: {listing(f'{k} {tuple(p.shape)}' for k, p in zip(keys, parts))} "
                        "(the pieces of linear1 must have one width)")
        continue
      for k in keys:
        del out[k]
      shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
      out[fused_key(i, param)] = LazyTensor(
          shape, np.result_type(*[np.dtype(p.dtype) for p in parts]),
          lambda parts=parts: np.concatenate([materialise(p) for p in parts], axis=0), where=fused_key(i, param))
  if problems:
    raise ConversionError("diffusers FLUX state dict does not match the inferred config: " + "; ".join(problems))
  return out


def split_single_blocks(tensors: dict[str, np.ndarray], cfg: FluxConfig) -> dict[str, np.ndarray]:
  """Inverse of :func:`fuse_single_blocks` on exported arrays: each virtual key back into its four pieces."""
  out = dict(tensors)
  d = cfg.hidden_size
  for i in range(cfg.num_single_layers):
    for param in ("weight", "bias"):
      pieces = np.split(out.pop(fused_key(i, param)), [d, 2 * d, 3 * d], axis=0)
      out.update((f"single_transformer_blocks.{i}.{p}.{param}", np.ascontiguousarray(a))
                 for p, a in zip(SINGLE_PARTS, pieces))
  return out


# Per layout: the keys config inference reads.
_KEYS = {
    "bfl": dict(double="double_blocks", single="single_blocks", img="img_in.weight", txt="txt_in.weight",
                pooled="vector_in.in_layer.weight", final="final_layer.linear.weight",
                guidance="guidance_in.in_layer.weight", norm_q="double_blocks.0.img_attn.norm.query_norm.scale",
                mlp="double_blocks.0.img_mlp.0.weight"),
    "diffusers": dict(double="transformer_blocks", single="single_transformer_blocks", img="x_embedder.weight",
                      txt="context_embedder.weight", pooled="time_text_embed.text_embedder.linear_1.weight",
                      final="proj_out.weight", guidance="time_text_embed.guidance_embedder.linear_1.weight",
                      norm_q="transformer_blocks.0.attn.norm_q.weight",
                      mlp="transformer_blocks.0.ff.net.0.proj.weight"),
}
OVERRIDES = ("axes_dims_rope", "theta")  # what the weights cannot show


def infer_config(tensors: dict, layout: str, diffusers_config: dict[str, Any] | None = None,
                 **overrides) -> FluxConfig:
  """FluxConfig from the shapes of a BFL or diffusers state dict (a ComfyUI prefix stripped first): depths from
  the block counts, ``in_channels`` / ``out_channels`` from ``img_in`` / the final linear (Fill 384, Canny /
  Depth 128), ``guidance_embeds`` from the presence of the guidance embedder. ``axes_dims_rope`` comes from an
  override, config.json, or (128-wide heads) FLUX.1's (16, 56, 56); ``theta`` from an override, else 10000. A
  config.json of another class, with impossible values or contradicting the weights is an error naming the field."""
  pick_table(LAYOUTS, layout, "FLUX")
  unknown = sorted(k for k, v in overrides.items() if v is not None and k not in OVERRIDES)
  if unknown:
    raise ConversionError(f"FLUX config overrides {', '.join(unknown)} are not supported (only "
                          f"{', '.join(OVERRIDES)}; the rest comes from the weights)")
  dcfg = checked_config(diffusers_config, CONFIG_CLASSES, *_INT_FIELDS, int_lists=("axes_dims_rope",))
  if dcfg.get("guidance_embeds") is not None and not isinstance(dcfg["guidance_embeds"], bool):
    raise ConversionError(f"config.json guidance_embeds={dcfg['guidance_embeds']!r} is not a boolean")
  tensors, keys = strip_prefix(tensors), _KEYS[layout]
  img, txt = need(tensors, keys["img"], "FLUX"), need(tensors, keys["txt"], "FLUX")
  pooled, final = need(tensors, keys["pooled"], "FLUX"), need(tensors, keys["final"], "FLUX")
  norm_q, mlp = need(tensors, keys["norm_q"], "FLUX"), need(tensors, keys["mlp"], "FLUX")
  hidden, head_dim = img.shape[0], norm_q.shape[0]
  if head_dim <= 0 or hidden % head_dim:
    raise ConversionError(f"{keys['norm_q']} has width {head_dim}: cannot split hidden size {hidden} into heads")
  axes = overrides.get("axes_dims_rope") or dcfg.get("axes_dims_rope")
  if dcfg.get("axes_dims_rope") is not None and tuple(axes) != tuple(dcfg["axes_dims_rope"]):
    raise ConversionError(f"axes_dims_rope={list(axes)} contradicts config.json's {list(dcfg['axes_dims_rope'])}")
  if axes is None:
    if head_dim != 128:
      raise ConversionError(f"cannot infer axes_dims_rope for {head_dim}-wide heads (FLUX.1's (16, 56, 56) needs "
                            "128); pass axes_dims_rope (--axes-dims-rope) or a config.json")
    axes = (16, 56, 56)
  values = dict(
      in_channels=img.shape[1], out_channels=final.shape[0], num_layers=count_blocks(tensors, keys["double"],
                                                                                   "double blocks"),
      num_single_layers=count_blocks(tensors, keys["single"], "single blocks"), attention_head_dim=head_dim,
      num_attention_heads=hidden // head_dim, joint_attention_dim=txt.shape[1], pooled_projection_dim=pooled.shape[1],
      guidance_embeds=keys["guidance"] in tensors)
  config_agrees(dcfg, patch_size=1, **values)
  try:
    return FluxConfig(**values, axes_dims_rope=tuple(axes), theta=overrides.get("theta") or 10_000,
                      mlp_ratio=mlp.shape[0] / hidden)
  except (ValueError, TypeError) as e:
    raise ConversionError(str(e)) from None


def to_model(tensors: dict, cfg: FluxConfig, layout: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
             attention_impl: str = "auto", allow_nonfinite: bool = False) -> Flux:
  """Apply the layout's key table strictly and streaming (:func:`~dit_jax.convert.engine.apply_table`): every
  source key used, every parameter filled, shapes and float dtypes checked, NaN / Inf refused unless
  ``allow_nonfinite`` (a ComfyUI prefix is stripped first)."""
  table = pick_table(LAYOUTS, layout, "FLUX")
  tensors = strip_prefix(tensors)
  if layout == "diffusers":
    tensors = fuse_single_blocks(tensors)
  abstract = nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                         attention_impl=attention_impl))
  return apply_table(tensors, table(cfg), abstract, cfg, what=f"{layout} FLUX", ops=OPS,
                     allow_nonfinite=allow_nonfinite)


def from_model(model: Flux, layout: str) -> dict[str, np.ndarray]:
  """The exact inverse of :func:`to_model`: the layout's key -> numpy array (BFL keys without a prefix)."""
  out = export_table(model, pick_table(LAYOUTS, layout, "FLUX")(model.config), OPS)
  return split_single_blocks(out, model.config) if layout == "diffusers" else out
