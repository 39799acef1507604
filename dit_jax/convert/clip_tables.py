"""CLIP text-encoder key tables (transformers and OpenCLIP layouts) -> :class:`CLIPTextModel`, layout detection,
config inference and export.

* ``hf``: transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` (``text_model.embeddings.*``,
  ``text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj``, ``text_model.final_layer_norm``,
  ``text_projection.weight``): SD3's separate ``text_encoders/clip_{l,g}.safetensors``, diffusers folders, and
  SD3 single files under ``text_encoders.clip_{l,g}.transformer.`` (:func:`strip_prefix`). transformers >= 5.6
  saves a ``CLIPTextModel`` without ``text_model.`` (flattened); such files are read too, and exports always use
  ``text_model.*``, which every transformers version loads.
* ``openclip``: OpenCLIP's own module names (``token_embedding``, ``positional_embedding``,
  ``transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_final``,
  ``text_projection``), as SDXL (``conditioner.embedders.1.model.``) and SD2 single files keep them.

The JAX model fuses q/k/v: transformers' three projections are concatenated along torch's output axis, OpenCLIP's
``in_proj`` is already [q | k | v]. OpenCLIP's ``text_projection`` is a (D, P) parameter used as ``x @ P`` (the
transpose of transformers' Linear weight). Keys the upstream loaders ignore (``text_model.embeddings.position_ids``,
OpenCLIP's ``logit_scale``) are accepted and dropped.

    tensors = strip_prefix(tensors)                       # an SD3 / SDXL single file's encoder, prefix stripped
    layout = detect_layout(tensors)                       # 'hf' | 'openclip'
    cfg = infer_config(tensors, layout, transformers_config_json)
    model = to_model(tensors, cfg, layout)                # strict: every key used, every parameter filled
    tensors = from_model(model, layout)                   # the exact inverse
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.convert import engine
from dit_jax.convert.engine import Path, Rule, apply_table, count_blocks, export_table, listing, need, pick_table
from dit_jax.convert.readers import ConversionError
from dit_jax.models.clip import ACTIVATIONS, CLIPTextConfig, CLIPTextModel

__all__ = ["HF_PREFIX", "LAYOUTS", "OPS", "detect_layout", "from_model", "hf_prefix", "hf_table", "infer_config",
           "openclip_table", "strip_prefix", "to_model"]

HF_PREFIX = "text_model."
OPS = engine.OPS
# Width -> activation of the released encoders: OpenAI CLIP-L/14 (quick_gelu), OpenCLIP bigG/14 (exact gelu).
ACT_BY_WIDTH = {768: "quick_gelu", 1280: "gelu"}
# Per layout: the keys only that layout has (their position after a file prefix gives the prefix), the keys
# config inference reads, and keys the upstream loaders ignore (dropped here).
_KEYS = {
    "hf": dict(anchor=("embeddings.token_embedding.weight", "embeddings.position_embedding.weight"),
               token=f"{HF_PREFIX}embeddings.token_embedding.weight",
               pos=f"{HF_PREFIX}embeddings.position_embedding.weight", blocks=f"{HF_PREFIX}encoder.layers",
               fc1=f"{HF_PREFIX}encoder.layers.0.mlp.fc1.weight", proj="text_projection.weight",
               ignored=(f"{HF_PREFIX}embeddings.position_ids",)),
    "openclip": dict(anchor=("token_embedding.weight", "positional_embedding"), token="token_embedding.weight",
                     pos="positional_embedding", blocks="transformer.resblocks",
                     fc1="transformer.resblocks.0.mlp.c_fc.weight", proj="text_projection", ignored=("logit_scale",)),
}


def _linear(target: Path, source: str, bias: bool = True) -> list[Rule]:
  return [Rule(target + ("kernel",), (f"{source}.weight",), "T")] + (
      [Rule(target + ("bias",), (f"{source}.bias",))] if bias else [])


def _norm(target: Path, source: str) -> list[Rule]:
  return [Rule(target + ("scale",), (f"{source}.weight",)), Rule(target + ("bias",), (f"{source}.bias",))]


def hf_table(cfg: CLIPTextConfig) -> list[Rule]:
  """transformers ``CLIPTextModel`` (+ ``text_projection`` of ``CLIPTextModelWithProjection``)."""
  t = HF_PREFIX
  rules = [Rule(("token_embedding", "embedding"), (f"{t}embeddings.token_embedding.weight",)),
           Rule(("position_embedding",), (f"{t}embeddings.position_embedding.weight",))]
  for i in range(cfg.num_hidden_layers):
    src, dst = f"{t}encoder.layers.{i}", ("layers", i)
    attn = f"{src}.self_attn"
    rules += [Rule(dst + ("self_attn", "qkv", "kernel"), tuple(f"{attn}.{c}_proj.weight" for c in "qkv"), "T",
                   "concat"),
              Rule(dst + ("self_attn", "qkv", "bias"), tuple(f"{attn}.{c}_proj.bias" for c in "qkv"), "copy",
                   "concat")]
    rules += _linear(dst + ("self_attn", "out_proj"), f"{attn}.out_proj")
    rules += _norm(dst + ("layer_norm1",), f"{src}.layer_norm1") + _norm(dst + ("layer_norm2",), f"{src}.layer_norm2")
    rules += _linear(dst + ("mlp", "fc1"), f"{src}.mlp.fc1") + _linear(dst + ("mlp", "fc2"), f"{src}.mlp.fc2")
  rules += _norm(("final_layer_norm",), f"{t}final_layer_norm")
  if cfg.projection_dim is not None:
    rules += _linear(("text_projection",), "text_projection", bias=False)
  return rules


def openclip_table(cfg: CLIPTextConfig) -> list[Rule]:
  """OpenCLIP's text tower (``open_clip.CLIP`` / SDXL's ``FrozenOpenCLIPEmbedder2``), prefix stripped."""
  rules = [Rule(("token_embedding", "embedding"), ("token_embedding.weight",)),
           Rule(("position_embedding",), ("positional_embedding",))]
  for i in range(cfg.num_hidden_layers):
    src, dst = f"transformer.resblocks.{i}", ("layers", i)
    rules += [Rule(dst + ("self_attn", "qkv", "kernel"), (f"{src}.attn.in_proj_weight",), "T"),
              Rule(dst + ("self_attn", "qkv", "bias"), (f"{src}.attn.in_proj_bias",))]
    rules += _linear(dst + ("self_attn", "out_proj"), f"{src}.attn.out_proj")
    rules += _norm(dst + ("layer_norm1",), f"{src}.ln_1") + _norm(dst + ("layer_norm2",), f"{src}.ln_2")
    rules += _linear(dst + ("mlp", "fc1"), f"{src}.mlp.c_fc") + _linear(dst + ("mlp", "fc2"), f"{src}.mlp.c_proj")
  rules += _norm(("final_layer_norm",), "ln_final")
  if cfg.projection_dim is not None:
    rules.append(Rule(("text_projection", "kernel"), ("text_projection",)))  # stored (D, P): x @ P
  return rules


LAYOUTS = {"hf": hf_table, "openclip": openclip_table}
ORIGINAL_LAYOUT = "hf"  # what export's layout "original" means: SD3's own text-encoder files
FILE_PREFIX: dict[str, str] = {}  # layout -> the key prefix of an exported file


def _prefixes(tensors, layout: str) -> list[str]:
  """The key prefixes in front of the layout's anchor keys (hf: ``text_model.`` included when present)."""
  first, *rest = _KEYS[layout]["anchor"]
  found = {k[:-len(first)] for k in tensors if k.endswith(first)}
  return sorted(p for p in found if all(p + k in tensors for k in rest))


def _locate(tensors) -> tuple[str, str, bool] | None:
  """(layout, file prefix, flattened) of the one CLIP text model in ``tensors``; None when there is none.
  flattened: a transformers >= 5.6 ``CLIPTextModel`` file, whose keys lack ``text_model.``."""
  for layout in LAYOUTS:
    found = _prefixes(tensors, layout)
    if len(found) > 1:
      raise ConversionError(f"found {len(found)} {layout} CLIP text models, under {listing(repr(p) for p in found)}; "
                            "give one encoder's keys")
    if found:
      prefix = found[0]
      if layout == "hf" and prefix.endswith(HF_PREFIX):
        return layout, prefix[:-len(HF_PREFIX)], False
      return layout, prefix, layout == "hf"
  return None


def hf_prefix(tensors: dict[str, np.ndarray]) -> str:
  """The file prefix in front of a transformers CLIP's ``text_model.*`` keys: '' for a bare state dict,
  ``text_encoders.clip_g.transformer.`` for an SD3 single file's CLIP-G. ConversionError when the keys hold no
  transformers CLIP text model or several (give one encoder's keys)."""
  found = _locate(tensors)
  if found is None or found[0] != "hf":
    raise ConversionError(f"no transformers CLIP text model ({HF_PREFIX}embeddings.token_embedding.weight) in the keys")
  return found[1]


def strip_prefix(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The encoder's keys as the tables name them: the file prefix in front of them removed (an SD3 single file's
  ``text_encoders.clip_l.transformer.``, SDXL's ``conditioner.embedders.1.model.``; keys outside it are left out)
  and ``text_model.`` put back in front of a flattened transformers >= 5.6 ``CLIPTextModel`` file's keys. Keys
  holding no CLIP text model are returned unchanged."""
  found = _locate(tensors)
  if found is None:
    return tensors
  _, prefix, flattened = found
  out = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
  if flattened:
    out = {k if k == "text_projection.weight" else HF_PREFIX + k: v for k, v in out.items()}
  return out


def detect_layout(tensors: dict[str, np.ndarray]) -> str:
  """'hf' or 'openclip', from the key names (a file prefix in front of them is allowed)."""
  found = _locate(tensors)
  if found is not None:
    return found[0]
  raise ConversionError(f"not a CLIP text encoder state dict: found neither [{HF_PREFIX}]embeddings.token_embedding"
                        f".weight (hf) nor {' + '.join(_KEYS['openclip']['anchor'])} (openclip)")


def _kept(tensors: dict[str, np.ndarray], layout: str) -> dict[str, np.ndarray]:
  """The prefix stripped and the keys the upstream loaders ignore dropped."""
  tensors = strip_prefix(tensors)
  return {k: v for k, v in tensors.items() if k not in _KEYS[layout]["ignored"]}


MODEL_TYPES = ("clip_text_model", "clip")  # transformers' CLIPTextConfig / a whole CLIPConfig's text part
CONFIG_CLASSES = ()  # transformers' config.json has no _class_name


def _checked(config) -> dict[str, Any]:
  """transformers' config.json checked before use: a CLIP text model_type, positive sizes, a known activation."""
  dcfg = engine.checked_config(config, CONFIG_CLASSES, "vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
                               numbers=("layer_norm_eps",))
  if dcfg.get("model_type") not in (None, *MODEL_TYPES):
    raise ConversionError(f"config.json describes a {dcfg['model_type']!r} model, not a CLIP text encoder "
                          f"(model_type {' / '.join(MODEL_TYPES)}): it does not belong to these weights")
  if dcfg.get("hidden_act") is not None and dcfg["hidden_act"] not in ACTIVATIONS:
    raise ConversionError(f"config.json hidden_act {dcfg['hidden_act']!r} is not one of {', '.join(ACTIVATIONS)}")
  return dcfg


def infer_config(tensors: dict[str, np.ndarray], layout: str, diffusers_config: dict[str, Any] | None = None,
                 **overrides) -> CLIPTextConfig:
  """CLIPTextConfig from the shapes (vocabulary, width, depth, MLP width, positions, projection present or not),
  transformers' config.json (``diffusers_config``: ``hidden_act``, ``layer_norm_eps``, ``num_attention_heads``)
  and ``overrides`` (highest priority). config.json's ``projection_dim`` is there even without a projection, so
  the ``text_projection`` key decides, and its ``eos_token_id`` is often transformers' legacy 2, so it is not read.
  Without a config the heads are 64 wide (CLIP-L and bigG) and the activation follows the width: 768 quick_gelu
  (OpenAI CLIP-L), 1280 gelu (OpenCLIP bigG); other widths need ``hidden_act``."""
  pick_table(LAYOUTS, layout, "CLIP text")
  keys, dcfg = _KEYS[layout], _checked(diffusers_config)
  tensors = _kept(tensors, layout)
  token = need(tensors, keys["token"], "CLIP text")
  pos = need(tensors, keys["pos"], "CLIP text")
  fc1 = need(tensors, keys["fc1"], "CLIP text")
  proj = tensors.get(keys["proj"])
  hidden = int(token.shape[1])
  values: dict[str, Any] = dict(
      vocab_size=int(token.shape[0]), hidden_size=hidden, intermediate_size=int(fc1.shape[0]),
      num_hidden_layers=count_blocks(tensors, keys["blocks"], "transformer layers"),
      num_attention_heads=int(dcfg.get("num_attention_heads", max(hidden // 64, 1))),
      max_position_embeddings=int(pos.shape[0]),
      projection_dim=None if proj is None else int(proj.shape[0] if layout == "hf" else proj.shape[1]))
  if "hidden_act" in dcfg:
    values["hidden_act"] = dcfg["hidden_act"]
  elif hidden in ACT_BY_WIDTH:
    values["hidden_act"] = ACT_BY_WIDTH[hidden]
  elif overrides.get("hidden_act") is None:
    raise ConversionError(f"cannot tell the activation of a {hidden}-wide CLIP from its shapes (768: quick_gelu, "
                          f"1280: gelu); pass hidden_act ({' or '.join(ACTIVATIONS)})")
  if dcfg.get("layer_norm_eps") is not None:
    values["layer_norm_eps"] = float(dcfg["layer_norm_eps"])
  engine.config_agrees(dcfg, **{k: values[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                       "num_hidden_layers", "max_position_embeddings")})
  values.update({k: v for k, v in overrides.items() if v is not None})
  try:
    return CLIPTextConfig(**values)
  except (ValueError, TypeError) as e:
    raise ConversionError(str(e)) from None


def to_model(tensors: dict[str, np.ndarray], cfg: CLIPTextConfig, layout: str, *, dtype=jnp.float32,
             param_dtype=jnp.float32, allow_nonfinite: bool = False) -> CLIPTextModel:
  """Apply the layout's key table strictly: every source key used (but the ignored ones), every parameter filled,
  shapes checked, NaN / Inf refused unless ``allow_nonfinite`` (a file prefix is stripped first)."""
  table = pick_table(LAYOUTS, layout, "CLIP text")
  abstract = nnx.eval_shape(lambda: CLIPTextModel(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
  return apply_table(_kept(tensors, layout), table(cfg), abstract, cfg, what=f"{layout} CLIP text", ops=OPS,
                     allow_nonfinite=allow_nonfinite)


def from_model(model: CLIPTextModel, layout: str) -> dict[str, np.ndarray]:
  """The exact inverse of :func:`to_model`: the layout's key -> numpy array (no file prefix)."""
  return export_table(model, pick_table(LAYOUTS, layout, "CLIP text")(model.config), OPS)
