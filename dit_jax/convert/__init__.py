"""Import PyTorch DiT / MMDiT / VAE checkpoints (original, Stability or diffusers layouts) and export them back.

    convert(src, out_dir)                  # any supported source -> dit_jax checkpoint directory
    export(ckpt_dir, out_file, layout=...) # dit_jax checkpoint -> safetensors ('original' / 'stability' / 'diffusers')
"""
from __future__ import annotations

import logging
import os
import pathlib
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax import checkpoint
from dit_jax.convert import mmdit_tables, tables, vae_tables
from dit_jax.convert.readers import ConversionError, Source, from_numpy, read_source
from dit_jax.convert.tables import need
from dit_jax.models.dit import CONVENTIONS, SIZES, DiT, DiTConfig
from dit_jax.models.mmdit import MMDiTConfig

logger = logging.getLogger("dit_jax")

__all__ = ["ConversionError", "convert", "convert_state_dict", "convert_vae", "detect_layout", "export", "infer_config"]

_HEADS_BY_WIDTH = {h: n for _, h, n in SIZES.values()}
_listing = tables.listing

def detect_layout(tensors: dict[str, np.ndarray]) -> str:
  """'original' or 'diffusers', from the key names."""
  if "x_embedder.proj.weight" in tensors:
    return "original"
  if "pos_embed.proj.weight" in tensors and any(k.startswith("transformer_blocks.") for k in tensors):
    return "diffusers"
  raise ConversionError(f"not a DiT state dict: found neither x_embedder.proj.weight (original) nor "
                        f"pos_embed.proj.weight + transformer_blocks.* (diffusers); keys start with "
                        f"{_listing(list(tensors)[:tables.MAX_LISTED])}")



def _depth(tensors, prefix: str) -> int:
  indices = {int(m.group(1)) for k in tensors if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
  if not indices:
    raise ConversionError(f"no {prefix}.N.* keys: the checkpoint has no transformer blocks")
  missing = sorted(set(range(max(indices) + 1)) - indices)
  if missing:
    raise ConversionError(f"missing keys for {prefix}.{missing[0]} (blocks are not numbered 0..{max(indices)})")
  return max(indices) + 1


def infer_config(tensors: dict[str, np.ndarray], layout: str, diffusers_config: dict[str, Any] | None = None,
                 **overrides) -> DiTConfig:
  """Hyper-parameters from tensor shapes (plus diffusers' config.json where shapes are silent).

  ``num_heads`` is not visible in any shape: it comes from config.json, an override, the paper's sizes
  (384->6, 768->12, 1024->16, 1152->16), or hidden/64. ``input_size`` comes from the stored pos_embed
  (original), config.json's ``sample_size`` (diffusers) or an override, else 32 (256 px). The label table is
  taken to end with the null-class row (class_dropout_prob 0.1, as every released DiT); pass ``num_classes``
  equal to the row count for a model trained without label dropout.
  """
  dcfg = diffusers_config or {}
  if layout == "original":
    patch = need(tensors, "x_embedder.proj.weight")
    table = need(tensors, "y_embedder.embedding_table.weight")
    final = need(tensors, "final_layer.linear.weight")
    fc1 = need(tensors, "blocks.0.mlp.fc1.weight")
    depth = _depth(tensors, "blocks")
    pos = need(tensors, "pos_embed")
    grid = int(round(pos.shape[1] ** 0.5))
    if pos.ndim != 3 or grid * grid != pos.shape[1]:
      raise ConversionError(f"pos_embed has shape {pos.shape}, expected (1, T, D) with square T")
    inferred = dict(input_size=grid * patch.shape[2])
  else:
    patch = need(tensors, "pos_embed.proj.weight")
    table = need(tensors, "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight")
    final = need(tensors, "proj_out_2.weight")
    fc1 = need(tensors, "transformer_blocks.0.ff.net.0.proj.weight")
    depth = _depth(tensors, "transformer_blocks")
    inferred = {}
    if "sample_size" in dcfg:
      inferred["input_size"] = int(dcfg["sample_size"])
    if "num_attention_heads" in dcfg:
      inferred["num_heads"] = int(dcfg["num_attention_heads"])
    inferred["mlp_norm_eps"] = float(dcfg.get("norm_eps", CONVENTIONS["diffusers"]["mlp_norm_eps"]))
  hidden, in_channels, p = patch.shape[0], patch.shape[1], patch.shape[2]
  out_channels, rem = divmod(final.shape[0], p * p)
  if rem or out_channels not in (in_channels, 2 * in_channels):
    raise ConversionError(f"final linear has {final.shape[0]} outputs: not p*p*C or p*p*2C for p={p}, C={in_channels}")
  heads = _HEADS_BY_WIDTH.get(hidden, hidden // 64 if hidden % 64 == 0 else None)
  values = dict(CONVENTIONS[layout], patch_size=p, in_channels=in_channels, hidden_size=hidden, depth=depth,
                num_heads=heads, mlp_ratio=fc1.shape[0] / hidden, num_classes=table.shape[0] - 1,
                class_dropout_prob=0.1, learn_sigma=out_channels == 2 * in_channels, input_size=32)
  values.update(inferred)
  num_classes = overrides.pop("num_classes", None)
  if num_classes is not None:  # a table without the null row belongs to a model trained without label dropout
    if table.shape[0] not in (num_classes, num_classes + 1):
      raise ConversionError(f"label table has {table.shape[0]} rows: not num_classes={num_classes} (+1 null row)")
    values.update(num_classes=num_classes, class_dropout_prob=0.1 if table.shape[0] == num_classes + 1 else 0.0)
  values.update({k: v for k, v in overrides.items() if v is not None})
  if values["num_heads"] is None:
    raise ConversionError(f"cannot infer the number of heads for hidden size {hidden}; pass --num-heads")
  if layout == "diffusers" and "input_size" not in inferred and overrides.get("input_size") is None:
    logger.warning("no sample_size in the source; assuming input_size=32 (256 px). Pass --input-size to change.")
  try:
    return DiTConfig(**values)
  except ValueError as e:
    raise ConversionError(str(e)) from None


def convert_state_dict(tensors: dict[str, np.ndarray], cfg: DiTConfig, layout: str) -> DiT:
  """Apply the layout's key table strictly: every source key used, every parameter filled, shapes checked."""
  abstract = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
  return tables.apply_table(tensors, tables.TABLES[layout](cfg), abstract, cfg, what=f"{layout} DiT",
                            computed=tables.COMPUTED[layout])


def _source_meta(src, source: Source, layout: str) -> dict[str, Any]:
  dtypes = sorted({str(a.dtype) for a in source.tensors.values()})
  return {"source": {"path": str(src), "layout": layout, "description": source.description,
                     "dtype": dtypes[0] if len(dtypes) == 1 else "float32"}}


def _is_vae(tensors: dict[str, np.ndarray]) -> bool:
  keys = vae_tables.select_vae_tensors(tensors)
  return any(k.startswith(("encoder.down_blocks.", "encoder.down.")) for k in keys)


def _vae_from_source(src, source: Source, preset: str | None, *, default_16ch: str | None = None, **scales):
  tensors = vae_tables.select_vae_tensors(source.tensors)
  found = vae_tables.detect_vae_layout(tensors)
  conv_in = tensors.get("decoder.conv_in.weight")
  if preset is None and default_16ch and conv_in is not None and conv_in.shape[1] == 16:
    preset = default_16ch  # config.json values, when the source has them, still take precedence
  cfg = vae_tables.infer_vae_config(tensors, found, source.diffusers_config, preset=preset, **scales)
  return vae_tables.convert_vae_state_dict(tensors, cfg, found), _source_meta(src, Source(tensors, source.description),
                                                                               found)


def convert_vae(src: str | os.PathLike, *, preset: str | None = None, scaling_factor: float | None = None,
                shift_factor: float | None = None):
  """(AutoencoderKL, meta) from a diffusers AutoencoderKL folder / safetensors or an LDM / SD single file
  (``first_stage_model.*`` keys are taken from a full checkpoint, everything else in it is left alone)."""
  return _vae_from_source(src, read_source(src), preset, scaling_factor=scaling_factor, shift_factor=shift_factor)


def _convert_mmdit(src, source: Source, parts: tuple[dict, dict, int], out_dir, *, layout: str,
                   num_heads: int | None, input_size: int | None, vae, bundle_vae: bool, vae_preset: str | None,
                   overwrite: bool) -> MMDiTConfig:
  """An MMDiT (Stability single file, bare mmditx / diffusers state dict, SD3 pipeline folder) and its VAE."""
  tensors, file_vae, ignored = parts
  found = mmdit_tables.detect_mmdit_layout(tensors)
  if layout not in ("auto", found):
    raise ConversionError(f"{src} is an MMDiT in the {found} layout, not {layout}")
  if ignored:
    logger.info("ignoring %d text-encoder tensors (%s) in %s: dit_jax converts the MMDiT and its VAE only", ignored,
                ", ".join(f"{p}*" for p in mmdit_tables.TEXT_ENCODER_PREFIXES), src)
  cfg = mmdit_tables.infer_mmdit_config(tensors, source.diffusers_config, num_attention_heads=num_heads,
                                        sample_size=input_size)
  model = mmdit_tables.convert_mmdit_state_dict(tensors, cfg, found)
  vae_model = vae_meta = None
  if bundle_vae:
    pipeline_vae = pathlib.Path(src) / "vae"
    if vae is not None:
      vae_src, vae_source = vae, read_source(vae)
    elif pipeline_vae.is_dir():
      vae_src, vae_source = pipeline_vae, read_source(pipeline_vae)
    elif file_vae:
      vae_src, vae_source = src, Source(file_vae, f"{src} ({mmdit_tables.VAE_PREFIX}*)")
    else:
      vae_src = vae_source = None
    if vae_source is not None:
      vae_model, vae_meta = _vae_from_source(vae_src, vae_source, vae_preset, default_16ch="sd3")
      if vae_model.config.latent_channels != cfg.in_channels:
        raise ConversionError(f"the VAE has {vae_model.config.latent_channels} latent channels, the MMDiT takes "
                              f"{cfg.in_channels}")
  checkpoint.save(model, out_dir, overwrite=overwrite, extra=_source_meta(src, Source(tensors, source.description),
                                                                          found), vae=vae_model, vae_extra=vae_meta)
  return cfg


def convert(src: str | os.PathLike, out_dir: str | os.PathLike, *, layout: str = "auto", weights: str | None = None,
            num_heads: int | None = None, input_size: int | None = None, num_classes: int | None = None,
            vae: str | os.PathLike | None = None, bundle_vae: bool = True, vae_preset: str | None = None,
            overwrite: bool = False):
  """Convert a PyTorch DiT, MMDiT or VAE checkpoint into a dit_jax checkpoint directory; returns the model config.

  Args:
    src: a DiT (original ``.pt``/``.safetensors`` state dict or training checkpoint, diffusers folder or file, or
      a DiTPipeline folder), an MMDiT (Stability single file such as ``sd3.5_medium.safetensors``, a bare
      ``mmditx`` state dict, a diffusers ``SD3Transformer2DModel`` folder / file or an SD3 pipeline folder) or a
      VAE (diffusers AutoencoderKL folder / file, LDM / SD single file).
    out_dir: checkpoint directory to write (must not exist or be empty unless ``overwrite``).
    layout: key layout: 'auto' | 'original' | 'diffusers' for a DiT, 'auto' | 'stability' | 'diffusers' for an
      MMDiT.
    weights: training checkpoints only: 'ema' (default) or 'model'.
    num_heads, input_size: hyper-parameters shapes do not show (an MMDiT's num_attention_heads / sample_size).
    vae: a VAE source to bundle (``<out_dir>/vae``); by default a pipeline folder's ``vae/`` or a Stability single
      file's ``first_stage_model.*`` is bundled (``bundle_vae=False`` to skip).
    vae_preset: 'sd-vae-ft-ema', 'sdxl', 'sd3', 'flux', ... for latent scales a source does not record (a
      16-channel VAE bundled with an MMDiT defaults to 'sd3').
  """
  source: Source = read_source(src, weights)
  mmdit_parts = mmdit_tables.select_mmdit(source.tensors)
  if mmdit_parts is not None:
    if num_classes is not None:
      raise ConversionError("num_classes applies to a class-conditional DiT, not to an MMDiT")
    return _convert_mmdit(src, source, mmdit_parts, out_dir, layout=layout, num_heads=num_heads,
                          input_size=input_size, vae=vae, bundle_vae=bundle_vae, vae_preset=vae_preset,
                          overwrite=overwrite)
  if layout == "stability":
    raise ConversionError(f"{src} is not an MMDiT (no context_embedder.weight + joint_blocks.* / "
                          "transformer_blocks.*): the stability layout applies to MMDiT checkpoints only")
  if layout == "auto" and _is_vae(source.tensors) and "x_embedder.proj.weight" not in source.tensors:
    model, meta = convert_vae(src, preset=vae_preset)
    checkpoint.save(model, out_dir, overwrite=overwrite, extra=meta)
    return model.config
  found = detect_layout(source.tensors)
  if layout not in ("auto", found):
    raise ConversionError(f"{src} is in the {found} layout, not {layout}")
  cfg = infer_config(source.tensors, found, source.diffusers_config, num_heads=num_heads, input_size=input_size,
                     num_classes=num_classes)
  model = convert_state_dict(source.tensors, cfg, found)
  pipeline_vae = pathlib.Path(src) / "vae"
  if vae is None and bundle_vae and pipeline_vae.is_dir():
    vae = pipeline_vae
  vae_model, vae_meta = convert_vae(vae, preset=vae_preset) if vae is not None and bundle_vae else (None, None)
  if vae_model is not None and vae_model.config.latent_channels != cfg.in_channels:
    raise ConversionError(f"the VAE has {vae_model.config.latent_channels} latent channels, the DiT takes "
                          f"{cfg.in_channels}")
  checkpoint.save(model, out_dir, overwrite=overwrite, extra=_source_meta(src, source, found), vae=vae_model,
                  vae_extra=vae_meta)
  return cfg


def export(ckpt_dir: str | os.PathLike, out_file: str | os.PathLike, *, layout: str = "original",
           dtype: str | None = None, overwrite: bool = False) -> pathlib.Path:
  """Write a checkpoint's parameters as a safetensors state dict in the ``layout``'s torch key names.

  Layouts: a DiT 'original' | 'diffusers'; an MMDiT 'stability' (alias 'original'; Stability's single-file keys
  with the ``model.diffusion_model.`` prefix) | 'diffusers'; a VAE 'ldm' (alias 'original') | 'diffusers'.
  ``dtype`` defaults to the dtype the checkpoint was converted from (float32 for trained checkpoints), so an
  import followed by an export is bit-exact.
  """
  from safetensors.torch import save_file

  out = pathlib.Path(out_file)
  if out.exists() and not overwrite:
    raise ConversionError(f"{out} already exists (use --overwrite to replace it)")
  meta = checkpoint.read_meta(ckpt_dir)
  model = checkpoint.load(ckpt_dir)
  dtype = dtype or meta.get("source", {}).get("dtype", "float32")
  try:
    np_dtype = jnp.dtype(dtype)
  except TypeError:
    raise ConversionError(f"unknown dtype {dtype!r}") from None
  if meta["kind"] == "vae":
    layout = "ldm" if layout == "original" else layout
    arrays = vae_tables.export_vae_state_dict(model, layout)
  elif meta["kind"] == "mmdit":
    layout = "stability" if layout == "original" else layout
    if layout not in mmdit_tables.TABLES:
      raise ConversionError(f"unknown MMDiT layout {layout!r}; choose one of {', '.join(mmdit_tables.TABLES)}")
    arrays = mmdit_tables.export_mmdit_state_dict(model, layout)
    if layout == "stability":
      arrays = {mmdit_tables.STABILITY_PREFIX + k: v for k, v in arrays.items()}
  else:
    if layout not in tables.TABLES:
      raise ConversionError(f"unknown DiT layout {layout!r}; choose one of {', '.join(tables.TABLES)}")
    params = checkpoint.flat_params(model)
    arrays = {}
    for rule in tables.TABLES[layout](model.config):
      value = tables.OPS[rule.op][1](params[rule.target], model.config)
      arrays.update(zip(rule.sources, tables.split_target(rule, value)))
  tensors = {k: from_numpy(np.ascontiguousarray(v.astype(np_dtype))) for k, v in arrays.items()}
  tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  try:
    save_file(tensors, str(tmp), metadata={"format": "pt", "dit_jax_layout": layout})
    os.replace(tmp, out)
  finally:
    tmp.unlink(missing_ok=True)
  return out
