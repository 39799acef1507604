"""PyTorch checkpoint files / folders <-> dit_jax checkpoint directories (DiT, MMDiT, FLUX.1, VAE).

    convert(src, out_dir)                  # any supported source -> dit_jax checkpoint directory
    convert_vae(src)                       # (AutoencoderKL, meta) from a VAE source
    export(ckpt_dir, out_file, layout=...) # dit_jax checkpoint -> safetensors ('original' / 'stability' / 'bfl' /
                                           # 'diffusers' / ...)

Conversions stream: the source is read lazily (:class:`~dit_jax.convert.readers.LazyTensor`), the key table fills
the model one parameter at a time, and the checkpoint is written in bounded data files, so the peak memory is the
converted model plus about one source tensor. They are strict: option values are checked before anything is read,
and non-float or NaN / Inf weights (unless ``allow_nonfinite``), a config.json that does not describe the weights
and every key mismatch are one-line ConversionErrors; nothing on disk changes unless the conversion succeeds.
"""
from __future__ import annotations

import logging
import os
import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np

from dit_jax import checkpoint, kinds
from dit_jax.convert import dit_tables, flux_tables, inception_tables, mmdit_tables, text_files, vae_tables
from dit_jax.convert.engine import FLOAT_DTYPES
from dit_jax.convert.readers import ConversionError, Source, from_numpy, read_source
from dit_jax.models.vae import PRESETS, AutoencoderKL

logger = logging.getLogger("dit_jax")

__all__ = ["convert", "convert_vae", "export"]

LAYOUTS = ("auto", "original", "diffusers", "stability", "bfl")  # convert's layout argument
def _positive(name: str, value) -> None:
  if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
    raise ConversionError(f"{name}={value!r} is not a positive integer")


def _check_preset(preset: str | None) -> None:
  if preset is not None and preset not in PRESETS:
    raise ConversionError(f"unknown VAE preset {preset!r}; choose one of {', '.join(PRESETS)}")


def _check_options(*, layout: str, weights: str | None, num_heads, input_size, num_classes, vae, bundle_vae: bool,
                   vae_preset: str | None, text_encoders=None, bundle_text_encoders: bool = True,
                   axes_dims_rope=None) -> None:
  """convert's option values, checked before anything is read (each problem a one-line ConversionError)."""
  if layout not in LAYOUTS:
    raise ConversionError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
  if axes_dims_rope is not None and (
      not isinstance(axes_dims_rope, (list, tuple)) or not axes_dims_rope
      or not all(isinstance(a, int) and not isinstance(a, bool) and a > 0 for a in axes_dims_rope)):
    raise ConversionError(f"axes_dims_rope={axes_dims_rope!r} is not a list of positive integers")
  if weights not in (None, "ema", "model"):
    raise ConversionError(f"weights={weights!r}: choose 'ema' or 'model'")
  for name, value in (("num_heads", num_heads), ("input_size", input_size), ("num_classes", num_classes)):
    _positive(name, value)
  _check_preset(vae_preset)
  if vae is not None and not bundle_vae:
    raise ConversionError("a VAE to bundle (--vae) and bundle_vae=False (--no-vae) contradict each other")
  if text_encoders is not None and not bundle_text_encoders:
    raise ConversionError("text encoders to bundle (--text-encoders) and bundle_text_encoders=False "
                          "(--no-text-encoders) contradict each other")


def _source_meta(src, tensors: dict[str, np.ndarray], description: str, layout: str) -> dict[str, Any]:
  dtypes = sorted({np.dtype(a.dtype).name for a in tensors.values()})
  return {"source": {"path": str(src), "layout": layout, "description": description,
                     "dtype": dtypes[0] if len(dtypes) == 1 else "float32"}}


def _is_vae(tensors: dict[str, np.ndarray]) -> bool:
  keys = vae_tables.select_vae_tensors(tensors)
  return any(k.startswith(("encoder.down_blocks.", "encoder.down.")) for k in keys)


def _bare_ldm_default(source: Source) -> str | None:
  """'flux' for an LDM-layout VAE on its own, with no ``first_stage_model.`` prefix and no config.json: BFL's
  ``ae.safetensors`` (SD3's VAE comes inside Stability's single files or as a diffusers folder with its scales)."""
  tensors = source.tensors
  if source.diffusers_config is None and not any(k.startswith(vae_tables.LDM_PREFIX) for k in tensors) and any(
      k.startswith("encoder.down.") for k in tensors):
    return "flux"
  return None


def _vae_from_source(src, source: Source, preset: str | None, *, default_16ch: str | None = None,
                     allow_nonfinite: bool = False, **scales):
  tensors = vae_tables.select_vae_tensors(source.tensors)
  layout = vae_tables.detect_layout(tensors)
  conv_in = tensors.get("decoder.conv_in.weight")
  if (preset is None and default_16ch and conv_in is not None and conv_in.shape[1] == 16
      and scales.get("scaling_factor") is None):
    preset = default_16ch  # config.json values, when the source has them, still take precedence
    if source.diffusers_config is None:
      p = PRESETS[preset]
      logger.info("%s: a 16-channel VAE without recorded scales; using the %r latent scales (scaling_factor=%s "
                  "shift_factor=%s; --vae-preset to choose others)", src, preset, p.scaling_factor, p.shift_factor)
  cfg = vae_tables.infer_config(tensors, layout, source.diffusers_config, preset=preset, **scales)
  return (vae_tables.to_model(tensors, cfg, layout, allow_nonfinite=allow_nonfinite),
          _source_meta(src, tensors, source.description, layout))


def convert_vae(src: str | os.PathLike, *, preset: str | None = None, scaling_factor: float | None = None,
                shift_factor: float | None = None, allow_nonfinite: bool = False):
  """(AutoencoderKL, meta) from a diffusers AutoencoderKL folder / safetensors or an LDM / SD single file
  (``first_stage_model.*`` keys are taken from a full checkpoint, everything else in it is left alone); read
  tensor by tensor, strict as :func:`convert`."""
  _check_preset(preset)
  source = read_source(src, lazy=True)
  return _vae_from_source(src, source, preset, default_16ch=_bare_ldm_default(source), scaling_factor=scaling_factor,
                          shift_factor=shift_factor, allow_nonfinite=allow_nonfinite)


def _bundled_vae(src, vae, file_vae: dict | None, preset: str | None, *, default_16ch: str | None,
                 latent_channels: int, what: str, allow_nonfinite: bool) -> tuple[AutoencoderKL | None, dict | None]:
  """(VAE, meta) to bundle with a ``what`` ('DiT' / 'MMDiT'): ``vae`` if given, else a pipeline folder's
  ``vae/``, else the VAE tensors of a single file (``file_vae``); (None, None) when there is none."""
  pipeline_vae = pathlib.Path(src) / "vae"
  if vae is not None:
    vae_src, vae_source = vae, read_source(vae, lazy=True)
  elif pipeline_vae.is_dir():
    vae_src, vae_source = pipeline_vae, read_source(pipeline_vae, lazy=True)
  elif file_vae:
    vae_src, vae_source = src, Source(file_vae, f"{src} ({mmdit_tables.VAE_PREFIX}*)")
  else:
    return None, None
  model, meta = _vae_from_source(vae_src, vae_source, preset, default_16ch=default_16ch,
                                 allow_nonfinite=allow_nonfinite)
  if model.config.latent_channels != latent_channels:
    raise ConversionError(f"the VAE has {model.config.latent_channels} latent channels, the {what} takes "
                          f"{latent_channels}")
  return model, meta


def _no_vae(vae_preset: str | None, what: str) -> None:
  if vae_preset is not None:
    raise ConversionError(f"--vae-preset {vae_preset} applies to a VAE, and this {what} is converted without one "
                          "(no --vae, pipeline vae/ folder or first_stage_model.* keys, or --no-vae)")


def _convert_mmdit(src, source: Source, parts: tuple[dict, dict, int], out_dir, *, layout: str,
                   num_heads: int | None, input_size: int | None, vae, bundle_vae: bool, vae_preset: str | None,
                   overwrite: bool, allow_nonfinite: bool, text: dict):
  """An MMDiT (Stability single file, bare mmditx / diffusers state dict, SD3 pipeline folder), its VAE and its
  text encoders (``text``: plan_text_encoders' options, or None to leave them out)."""
  tensors, file_vae, ignored = parts
  found = mmdit_tables.detect_layout(tensors)
  if layout not in ("auto", found):
    raise ConversionError(f"{src} is an MMDiT in the {found} layout, not {layout}")
  cfg = mmdit_tables.infer_config(tensors, found, source.diffusers_config, num_attention_heads=num_heads,
                                  sample_size=input_size)
  plans = {} if text is None else text_files.plan_text_encoders(src, source.tensors, allow_nonfinite=allow_nonfinite,
                                                                **text)
  if plans:
    text_files.check_widths(plans, cfg.joint_attention_dim, cfg.pooled_projection_dim)
  elif ignored:
    logger.info("leaving out %d text-encoder tensors (%s) in %s", ignored,
                ", ".join(f"{p}*" for p in mmdit_tables.TEXT_ENCODER_PREFIXES), src)
  elif text is not None:
    logger.warning("%s has no text encoders: the model samples from precomputed embeddings only (add them with "
                   "--text-encoders DIR)", src)
  model = mmdit_tables.to_model(tensors, cfg, found, allow_nonfinite=allow_nonfinite)
  vae_model, vae_meta = (_bundled_vae(src, vae, file_vae, vae_preset, default_16ch="sd3", latent_channels=cfg.in_channels,
                                      what="MMDiT", allow_nonfinite=allow_nonfinite)
                         if bundle_vae else (None, None))
  if vae_model is None:
    _no_vae(vae_preset, "MMDiT")
  checkpoint.save(model, out_dir, overwrite=overwrite, extra=_source_meta(src, tensors, source.description, found),
        vae=vae_model, vae_extra=vae_meta,
        bundle=(lambda tmp: text_files.write_text_encoders(plans, tmp)) if plans else None)
  return cfg


def _convert_flux(src, source: Source, parts: tuple[dict, dict, int], out_dir, *, layout: str,
                  axes_dims_rope, vae, bundle_vae: bool, vae_preset: str | None, overwrite: bool,
                  allow_nonfinite: bool, text: dict | None):
  """A FLUX.1 transformer (BFL single file, with or without ComfyUI's prefix; diffusers folder / file; FluxPipeline
  folder) and its VAE (``--vae`` such as BFL's ``ae.safetensors``, a pipeline folder's ``vae/`` or a ComfyUI
  checkpoint's ``first_stage_model.*``; a 16-channel VAE without recorded scales gets the 'flux' preset) and its
  text encoders, CLIP-L and T5 (``text``: plan_text_encoders' options, or None to leave them out)."""
  tensors, file_vae, ignored = parts
  found = flux_tables.detect_layout(tensors)
  if layout not in ("auto", found) and not (layout == "original" and found == flux_tables.ORIGINAL_LAYOUT):
    raise ConversionError(f"{src} is a FLUX transformer in the {found} layout, not {layout}")
  cfg = flux_tables.infer_config(tensors, found, source.diffusers_config, axes_dims_rope=axes_dims_rope)
  # a ComfyUI checkpoint's text_encoders.* are left out (its CLIP-L / T5 come without tokenizers)
  plans = {} if text is None else text_files.plan_text_encoders(src, {}, allow_nonfinite=allow_nonfinite,
                                                                family="flux", **text)
  if plans:
    text_files.check_widths(plans, cfg.joint_attention_dim, cfg.pooled_projection_dim, family="flux")
  elif ignored:
    logger.info("leaving out %d text-encoder tensors (%s) in %s", ignored,
                ", ".join(f"{p}*" for p in flux_tables.TEXT_ENCODER_PREFIXES), src)
  model = flux_tables.to_model(tensors, cfg, found, allow_nonfinite=allow_nonfinite)
  vae_model, vae_meta = (_bundled_vae(src, vae, file_vae, vae_preset, default_16ch="flux",
                                      latent_channels=cfg.out_channels // 4, what="FLUX transformer",
                                      allow_nonfinite=allow_nonfinite) if bundle_vae else (None, None))
  if vae_model is None:
    _no_vae(vae_preset, "FLUX transformer")
  checkpoint.save(model, out_dir, overwrite=overwrite, extra=_source_meta(src, tensors, source.description, found),
                  vae=vae_model, vae_extra=vae_meta,
                  bundle=(lambda tmp: text_files.write_text_encoders(plans, tmp)) if plans else None)
  return cfg


def _convert_dit(src, source: Source, out_dir, *, layout: str, num_heads: int | None, input_size: int | None,
                 num_classes: int | None, vae, bundle_vae: bool, vae_preset: str | None, overwrite: bool,
                 allow_nonfinite: bool):
  """A DiT (original or diffusers layout, file, folder or DiTPipeline folder) and its VAE."""
  found = dit_tables.detect_layout(source.tensors)
  if layout not in ("auto", found):
    raise ConversionError(f"{src} is in the {found} layout, not {layout}")
  cfg = dit_tables.infer_config(source.tensors, found, source.diffusers_config, num_heads=num_heads,
                                input_size=input_size, num_classes=num_classes)
  model = dit_tables.to_model(source.tensors, cfg, found, allow_nonfinite=allow_nonfinite)
  vae_model, vae_meta = (_bundled_vae(src, vae, None, vae_preset, default_16ch=None, latent_channels=cfg.in_channels,
                                      what="DiT", allow_nonfinite=allow_nonfinite) if bundle_vae else (None, None))
  if vae_model is None:
    _no_vae(vae_preset, "DiT")
  checkpoint.save(model, out_dir, overwrite=overwrite, extra=_source_meta(src, source.tensors, source.description, found),
        vae=vae_model, vae_extra=vae_meta)
  return cfg


def _convert_inception(src, source: Source, out_dir, *, layout: str, overwrite: bool, allow_nonfinite: bool):
  """The FID Inception-v3 (one key layout: pytorch-fid's and torch-fidelity's files share it)."""
  if layout not in ("auto", "original"):
    raise ConversionError(f"{src} is an FID Inception-v3 (pytorch-fid / torch-fidelity): use layout 'auto'")
  tensors = inception_tables.select_inception_tensors(source.tensors)
  found = inception_tables.detect_layout(tensors)
  cfg = inception_tables.infer_config(tensors, found)
  model = inception_tables.to_model(tensors, cfg, found, allow_nonfinite=allow_nonfinite)
  checkpoint.save(model, out_dir, overwrite=overwrite, extra=inception_tables.source_meta(src, found))
  logger.info("converted the FID Inception-v3 %s (sha256 recorded) -> %s", src, out_dir)
  return cfg


def convert(src: str | os.PathLike, out_dir: str | os.PathLike, *, layout: str = "auto", weights: str | None = None,
            num_heads: int | None = None, input_size: int | None = None, num_classes: int | None = None,
            vae: str | os.PathLike | None = None, bundle_vae: bool = True, vae_preset: str | None = None,
            overwrite: bool = False, allow_nonfinite: bool = False, text_encoders: str | os.PathLike | None = None,
            tokenizers: str | os.PathLike | None = None, bundle_text_encoders: bool = True,
            axes_dims_rope: tuple[int, ...] | None = None):
  """Convert a PyTorch DiT, MMDiT, FLUX.1 or VAE checkpoint into a dit_jax checkpoint directory; returns the model
  config.

  Streams (peak memory: the converted model plus about one source tensor) and is strict: see the module docstring.

  Args:
    src: a DiT (original ``.pt``/``.safetensors`` state dict or training checkpoint, diffusers folder or file, or
      a DiTPipeline folder), an MMDiT (Stability single file such as ``sd3.5_medium.safetensors``, a bare
      ``mmditx`` state dict, a diffusers ``SD3Transformer2DModel`` folder / file or an SD3 pipeline folder), a
      FLUX.1 transformer (BFL's ``flux1-dev.safetensors`` / ``flux1-schnell.safetensors`` and the Fill / Canny /
      Depth files, the same with ComfyUI's ``model.diffusion_model.`` prefix, a diffusers
      ``FluxTransformer2DModel`` folder / file or a FluxPipeline folder) or a VAE (diffusers AutoencoderKL folder /
      file, LDM / SD single file, BFL's ``ae.safetensors``: an LDM-layout 16-channel VAE with no prefix and no
      config.json gets FLUX's latent scales unless ``vae_preset`` says otherwise), or the FID Inception-v3
      (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``, torch-fidelity's
      ``weights-inception-2015-12-05-6726825d.pth``; the file's sha256 is recorded in the checkpoint's metadata).
    out_dir: checkpoint directory to write (must not exist or be empty unless ``overwrite``).
    layout: key layout: 'auto' | 'original' | 'diffusers' for a DiT, 'auto' | 'stability' | 'diffusers' for an
      MMDiT, 'auto' | 'bfl' (alias 'original') | 'diffusers' for FLUX.
    weights: training checkpoints only: 'ema' (default) or 'model'.
    num_heads, input_size: hyper-parameters shapes do not show (an MMDiT's num_attention_heads / sample_size).
    vae: a VAE source to bundle (``<out_dir>/vae``); by default a pipeline folder's ``vae/`` or a Stability single
      file's ``first_stage_model.*`` is bundled (``bundle_vae=False`` to skip).
    vae_preset: 'sd-vae-ft-ema', 'sdxl', 'sd3', 'flux', ... for latent scales a source does not record (a
      16-channel VAE bundled with an MMDiT defaults to 'sd3', with FLUX to 'flux'); an error when no VAE is
      converted.
    allow_nonfinite: convert NaN / Inf weights instead of refusing them.
    text_encoders: an MMDiT's or FLUX transformer's text encoders from Stability's / ComfyUI's files
      (``clip_l.safetensors``, ``clip_g.safetensors`` (SD3), ``t5xxl_fp16.safetensors``) or a pipeline folder; by
      default a pipeline folder's ``text_encoder*/`` or a single file's ``text_encoders.*`` are bundled (``<out_dir>/text_encoders``; ``bundle_text_encoders=False``
      to skip). A CLIP or T5 file on its own converts to a ``clip_text`` / ``t5_encoder`` checkpoint.
    tokenizers: a folder with the tokenizers' files (``tokenizer/``, ``tokenizer_2/``, ``tokenizer_3/`` as the SD3
      or FLUX pipeline names them) when the source has none.
    axes_dims_rope: a FLUX transformer's rotary widths per position axis when neither a config.json nor FLUX.1's
      128-wide heads (16, 56, 56) give them.
  """
  _check_options(layout=layout, weights=weights, num_heads=num_heads, input_size=input_size,
                 num_classes=num_classes, vae=vae, bundle_vae=bundle_vae, vae_preset=vae_preset,
                 text_encoders=text_encoders, bundle_text_encoders=bundle_text_encoders, axes_dims_rope=axes_dims_rope)
  source: Source = read_source(src, weights, lazy=True)
  bundling = dict(vae=vae, bundle_vae=bundle_vae, vae_preset=vae_preset, overwrite=overwrite,
                  allow_nonfinite=allow_nonfinite)
  flux_parts = flux_tables.select_flux(source.tensors)
  if flux_parts is not None:
    given = [n for n, v in (("num_heads", num_heads), ("input_size", input_size), ("num_classes", num_classes))
             if v is not None]
    if given:
      raise ConversionError(f"{', '.join(given)} do not apply to a FLUX transformer (its config comes from the "
                            "weights)")
    text = dict(text_encoders=text_encoders, tokenizers=tokenizers) if bundle_text_encoders else None
    return _convert_flux(src, source, flux_parts, out_dir, layout=layout, axes_dims_rope=axes_dims_rope, text=text,
                         **bundling)
  if axes_dims_rope is not None:
    raise ConversionError(f"{src} is not a FLUX transformer: axes_dims_rope applies to FLUX only")
  if layout == "bfl":
    raise ConversionError(f"{src} is not a FLUX transformer (no img_in.weight + double_blocks.* / x_embedder.weight "
                          "+ single_transformer_blocks.*): the bfl layout applies to FLUX checkpoints only")
  mmdit_parts = mmdit_tables.select_mmdit(source.tensors)
  if mmdit_parts is not None:
    if num_classes is not None:
      raise ConversionError("num_classes applies to a class-conditional DiT, not to an MMDiT")
    text = dict(text_encoders=text_encoders, tokenizers=tokenizers) if bundle_text_encoders else None
    return _convert_mmdit(src, source, mmdit_parts, out_dir, layout=layout, num_heads=num_heads,
                          input_size=input_size, text=text, **bundling)
  if text_encoders is not None or tokenizers is not None:
    raise ConversionError(f"{src} is not an MMDiT or a FLUX transformer: --text-encoders / --tokenizers bundle an "
                          "SD3 or FLUX model's encoders")
  if layout == "stability":
    raise ConversionError(f"{src} is not an MMDiT (no context_embedder.weight + joint_blocks.* / "
                          "transformer_blocks.*): the stability layout applies to MMDiT checkpoints only")
  if inception_tables.is_inception(source.tensors):
    return _convert_inception(src, source, out_dir, layout=layout, overwrite=overwrite,
                              allow_nonfinite=allow_nonfinite)
  encoder = text_files.plan_single(src, source, allow_nonfinite) if layout == "auto" else None
  if encoder is not None:  # a CLIP or T5 text encoder on its own
    checkpoint.save(encoder.convert(), out_dir, overwrite=overwrite, extra=encoder.meta())
    return encoder.config
  if layout == "auto" and _is_vae(source.tensors) and "x_embedder.proj.weight" not in source.tensors:
    model, meta = _vae_from_source(src, source, vae_preset, default_16ch=_bare_ldm_default(source),
                                   allow_nonfinite=allow_nonfinite)
    checkpoint.save(model, out_dir, overwrite=overwrite, extra=meta)
    return model.config
  return _convert_dit(src, source, out_dir, layout=layout, num_heads=num_heads, input_size=input_size,
                      num_classes=num_classes, **bundling)


def _numpy_dtype(dtype: str):
  """A float dtype for exported tensors, by name (FLOAT_DTYPES)."""
  try:
    np_dtype = jnp.dtype(dtype)
  except TypeError:
    raise ConversionError(f"unknown dtype {dtype!r}; choose one of {', '.join(FLOAT_DTYPES)}") from None
  if np_dtype.name not in FLOAT_DTYPES:
    raise ConversionError(f"dtype {dtype!r} is not a float dtype; choose one of {', '.join(FLOAT_DTYPES)}")
  return np_dtype


def _save_safetensors(arrays: dict[str, np.ndarray], out: pathlib.Path, dtype, layout: str) -> None:
  """Write ``arrays`` cast to ``dtype`` atomically (a temporary file next to ``out``, then a rename)."""
  from safetensors.torch import save_file

  tensors = {k: from_numpy(np.ascontiguousarray(v.astype(dtype))) for k, v in arrays.items()}
  tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  try:
    save_file(tensors, str(tmp), metadata={"format": "pt", "dit_jax_layout": layout})
    os.replace(tmp, out)
  finally:
    tmp.unlink(missing_ok=True)


def export(ckpt_dir: str | os.PathLike, out_file: str | os.PathLike, *, layout: str = "original",
           dtype: str | None = None, overwrite: bool = False) -> pathlib.Path:
  """Write a checkpoint's parameters as a safetensors state dict in the ``layout``'s torch key names.

  Layouts: a DiT 'original' | 'diffusers'; an MMDiT 'stability' (alias 'original'; Stability's single-file keys
  with the ``model.diffusion_model.`` prefix) | 'diffusers'; a FLUX transformer 'bfl' (alias 'original'; BFL's
  single-file keys, no prefix) | 'diffusers'; a VAE 'ldm' (alias 'original'; BFL's ``ae.safetensors`` keys for a
  FLUX VAE) | 'diffusers'.
  ``dtype`` defaults to the dtype the checkpoint was converted from (float32 for trained checkpoints), so an
  import followed by an export is bit-exact.
  """
  out = pathlib.Path(out_file)
  if out.exists() and not overwrite:
    raise ConversionError(f"{out} already exists (use --overwrite to replace it)")
  meta = checkpoint.read_meta(ckpt_dir)
  np_dtype = _numpy_dtype(dtype or meta.get("source", {}).get("dtype", "float32"))
  tables = kinds.get(meta["kind"]).tables
  layout = tables.ORIGINAL_LAYOUT if layout == "original" else layout
  if layout not in tables.LAYOUTS:  # checked before the (possibly large) checkpoint is loaded
    raise ConversionError(f"a {meta['kind']} checkpoint exports in the {' / '.join(tables.LAYOUTS)} layout, not "
                          f"{layout!r}")
  prefix = tables.FILE_PREFIX.get(layout, "")
  model = checkpoint.load(ckpt_dir)
  arrays = {prefix + k: v for k, v in tables.from_model(model, layout).items()}
  _save_safetensors(arrays, out, np_dtype, layout)
  return out
