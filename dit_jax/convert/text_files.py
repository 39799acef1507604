"""SD3's or FLUX.1's text encoders from the files a user has -> ``<model>/text_encoders/{clip_l,clip_g,t5xxl}``
(FLUX: ``{clip_l,t5xxl}``) bundled beside the MMDiT / FLUX transformer (each a dit_jax checkpoint with its
tokenizer's files in ``tokenizer/``).

Where each encoder comes from, first found wins:

    --text-encoders DIR   Stability's / ComfyUI's files clip_l.safetensors, clip_g.safetensors (SD3),
                          t5xxl*.safetensors (or a pipeline folder); clip_g may be OpenCLIP's native layout
                          (open_clip_pytorch_model.*)
    pipeline folder       SD3: text_encoder/ (CLIP-L), text_encoder_2/ (CLIP-G), text_encoder_3/ (T5); FluxPipeline:
                          text_encoder/ (CLIP-L), text_encoder_2/ (T5); transformers folders
    single file           text_encoders.{clip_l,clip_g,t5xxl}.transformer.* (SD3, ComfyUI FLUX checkpoints)

Tokenizers: ``--tokenizers DIR`` (a pipeline folder, or one with tokenizer/, tokenizer_2/[, tokenizer_3/] as the
family's pipeline names them, or clip_l/, t5xxl/ ...), else the pipeline folder's own. Everything is checked (layouts, configs, widths against the MMDiT, tokenizer files) before
the first tensor is converted; the encoders are then converted and written one at a time, so peak memory is one
encoder plus one source tensor.
"""
from __future__ import annotations

import dataclasses
import gc
import pathlib
from typing import Any, Callable

import numpy as np


from dit_jax import checkpoint
from dit_jax.convert import clip_tables, t5_tables
from dit_jax.convert.readers import ConversionError, Source, open_safetensors, read_model_folder, read_torch_file
from dit_jax.text import tokenizers as tok
from dit_jax.text.encoders import BUNDLED, TOKENIZER

# name in the bundle -> (pipeline subfolder, tokenizer subfolder, single-file prefix, Stability file glob)
ENCODERS = {
    "clip_l": ("text_encoder", "tokenizer", "text_encoders.clip_l.transformer.", "clip_l*.safetensors"),
    "clip_g": ("text_encoder_2", "tokenizer_2", "text_encoders.clip_g.transformer.", "clip_g*.safetensors"),
    "t5xxl": ("text_encoder_3", "tokenizer_3", "text_encoders.t5xxl.transformer.", "t5xxl*.safetensors"),
}
# FluxPipeline: CLIP-L (CLIPTextModel) + T5 (T5EncoderModel) under text_encoder/ and text_encoder_2/
FLUX_ENCODERS = {"clip_l": ENCODERS["clip_l"],
                 "t5xxl": ("text_encoder_2", "tokenizer_2", *ENCODERS["t5xxl"][2:])}
FAMILIES = {"sd3": (ENCODERS, ("clip_l", "clip_g"), "SD3 needs both CLIPs (T5 is optional)"),
            "flux": (FLUX_ENCODERS, ("clip_l", "t5xxl"), "FLUX needs CLIP-L and T5")}
OPENCLIP_FILES = ("open_clip_pytorch_model.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclasses.dataclass
class Planned:
  """One encoder, checked and ready to convert: ``convert()`` builds the model (the tensors are read then)."""

  name: str
  source: str
  layout: str
  config: Any
  tokenizer: Any
  convert: Callable[[], Any]
  dtype: str

  def meta(self) -> dict:
    """The checkpoint's ``source`` record (export writes the source dtype back)."""
    return {"source": {"path": self.source, "layout": self.layout, "dtype": self.dtype}}


def _stability_file(folder: pathlib.Path, name: str) -> pathlib.Path | None:
  pattern = ENCODERS[name][3]
  found = sorted(folder.glob(pattern))
  if name == "clip_g" and not found:
    found = [folder / f for f in OPENCLIP_FILES if (folder / f).is_file()][:1]
  if len(found) > 1:
    preferred = [p for p in found if p.stem in (name, f"{name}_fp16", f"{name}_fp32")]
    if len(preferred) != 1:
      raise ConversionError(f"{folder} holds several {pattern} files ({', '.join(p.name for p in found)}): keep one")
    found = preferred
  return found[0] if found else None


def _read_file(path: pathlib.Path) -> Source:
  if path.suffix == ".safetensors":
    return Source(open_safetensors(path), str(path))
  return read_torch_file(path)


def _source(name: str, src: pathlib.Path, file_tensors: dict, text_encoders: pathlib.Path | None,
            table: dict = ENCODERS) -> Source | None:
  """The tensors of encoder ``name`` (prefixes stripped), or None when no source has it."""
  subfolder, _, prefix, _ = table[name]
  if text_encoders is not None:
    if (text_encoders / subfolder).is_dir():
      return read_model_folder(text_encoders / subfolder)
    path = _stability_file(text_encoders, name)
    if path is not None:
      return _read_file(path)
  if src.is_dir() and (src / subfolder).is_dir():
    return read_model_folder(src / subfolder)
  picked = {k[len(prefix):]: v for k, v in file_tensors.items() if k.startswith(prefix)}
  return Source(picked, f"{src} ({prefix}*)") if picked else None


def _tokenizer(name: str, src: pathlib.Path, tokenizers: pathlib.Path | None, table: dict = ENCODERS):
  sub = table[name][1]
  folders = [f for f in ((tokenizers / sub) if tokenizers else None, (tokenizers / name) if tokenizers else None,
                         (src / sub) if src.is_dir() else None) if f is not None and f.is_dir()]
  if not folders:
    pipeline = "FluxPipeline folder's tokenizer/, tokenizer_2/" if table is FLUX_ENCODERS else \
        "diffusers SD3 folder's tokenizer/, tokenizer_2/, tokenizer_3/"
    raise ConversionError(f"no tokenizer for {name}: give --tokenizers DIR holding {sub}/ (a {pipeline})")
  try:
    return (tok.T5Tokenizer if name == "t5xxl" else tok.CLIPTokenizer).from_dir(folders[0])
  except tok.TokenizerError as e:
    raise ConversionError(str(e)) from None


def _clip_tensors(tensors: dict) -> dict:
  """OpenCLIP checkpoints hold the image tower too: keep the text side."""
  return {k: v for k, v in tensors.items() if not k.startswith(("visual.", "logit_scale", "logit_bias"))}


def _plan(name: str, source: Source, tokenizer, allow_nonfinite: bool) -> Planned:
  tables = t5_tables if name == "t5xxl" else clip_tables
  tensors = (t5_tables.select_t5_tensors(source.tensors) if name == "t5xxl"
             else clip_tables.strip_prefix(_clip_tensors(source.tensors)))
  layout = tables.detect_layout(tensors)
  cfg = tables.infer_config(tensors, layout, source.diffusers_config)
  dtypes = sorted({np.dtype(a.dtype).name for a in tensors.values()})
  convert = lambda: tables.to_model(tensors, cfg, layout, allow_nonfinite=allow_nonfinite)
  return Planned(name, source.description, layout, cfg, tokenizer, convert,
                 dtypes[0] if len(dtypes) == 1 else "float32")


def plan_single(src, source: Source, allow_nonfinite: bool = False) -> Planned | None:
  """A CLIP or T5 text encoder converted on its own (no tokenizer), or None when ``source`` holds neither."""
  if t5_tables.is_t5(t5_tables.select_t5_tensors(source.tensors)):
    return _plan("t5xxl", source, None, allow_nonfinite)
  try:
    clip_tables.detect_layout(_clip_tensors(source.tensors))
  except ConversionError:
    return None
  return _plan("clip", source, None, allow_nonfinite)


def check_widths(plans: dict[str, Planned], joint_attention_dim: int, pooled_projection_dim: int,
                 family: str = "sd3") -> None:
  """One-line ConversionError when the encoders cannot condition an MMDiT (family 'sd3') or a FLUX transformer
  ('flux': T5 width = joint_attention_dim, CLIP-L width = pooled_projection_dim) of these widths."""
  if family == "flux":
    width, pooled = plans["t5xxl"].config.d_model, plans["clip_l"].config.hidden_size
    if width != joint_attention_dim:
      raise ConversionError(f"T5's width {width} does not fit the FLUX transformer's joint_attention_dim "
                            f"{joint_attention_dim}")
    if pooled != pooled_projection_dim:
      raise ConversionError(f"CLIP-L's width {pooled} does not fit the FLUX transformer's pooled_projection_dim "
                            f"{pooled_projection_dim}")
    return
  l, g = plans["clip_l"].config, plans["clip_g"].config
  clip = l.hidden_size + g.hidden_size
  pooled = l.hidden_size + (g.projection_dim or g.hidden_size)
  if "t5xxl" in plans and plans["t5xxl"].config.d_model != joint_attention_dim:
    raise ConversionError(f"T5's width {plans['t5xxl'].config.d_model} does not fit the MMDiT's joint_attention_dim "
                          f"{joint_attention_dim}")
  if clip > joint_attention_dim:
    raise ConversionError(f"CLIP-L + CLIP-G give {clip}-wide states, wider than the MMDiT's joint_attention_dim "
                          f"{joint_attention_dim}")
  if pooled != pooled_projection_dim:
    raise ConversionError(f"CLIP-L + CLIP-G give a {pooled}-wide pooled vector, the MMDiT's pooled_projection_dim "
                          f"is {pooled_projection_dim}")


def plan_text_encoders(src, file_tensors: dict, *, text_encoders=None, tokenizers=None, allow_nonfinite: bool = False,
                       family: str = "sd3") -> dict[str, Planned]:
  """Find and check SD3's (``family`` 'sd3') or FLUX.1's ('flux') text encoders; {} when the source has none (and
  none were given)."""
  table, required, why = FAMILIES[family]
  src = pathlib.Path(src)
  extra = pathlib.Path(text_encoders) if text_encoders is not None else None
  if extra is not None and not extra.is_dir():
    raise ConversionError(f"--text-encoders {extra} is not a directory")
  tokenizers = pathlib.Path(tokenizers) if tokenizers is not None else None
  if tokenizers is not None and not tokenizers.is_dir():
    raise ConversionError(f"--tokenizers {tokenizers} is not a directory")
  sources = {name: _source(name, src, file_tensors, extra, table) for name in table}
  found = [n for n, s in sources.items() if s is not None]
  if not found:
    if extra is not None:
      raise ConversionError(f"--text-encoders {extra} holds none of "
                            f"{', '.join(spec[3] for spec in table.values())}, text_encoder*/")
    return {}
  missing = [n for n in required if sources[n] is None]
  if missing:
    raise ConversionError(f"found {', '.join(found)} but not {', '.join(missing)}: {why}; give them with "
                          "--text-encoders DIR")
  return {n: _plan(n, sources[n], _tokenizer(n, src, tokenizers, table), allow_nonfinite) for n in found}


def write_text_encoders(plans: dict[str, Planned], model_dir: pathlib.Path) -> None:
  """Convert and write each planned encoder under ``model_dir/text_encoders`` (one in memory at a time)."""
  for name, plan in plans.items():
    out = model_dir / BUNDLED / name
    model = plan.convert()
    checkpoint.save(model, out, overwrite=True, extra=plan.meta())
    plan.tokenizer.save(out / TOKENIZER)
    del model
    gc.collect()


def describe(plans: dict[str, Planned]) -> str:
  """' + text encoders CLIP-L (12 layers) ...' for the converter's summary line."""
  if not plans:
    return ""
  parts = [f"{n} ({getattr(p.config, 'num_hidden_layers', getattr(p.config, 'num_layers', '?'))} layers)"
           for n, p in plans.items()]
  return " + text encoders " + ", ".join(parts)


__all__ = ["ENCODERS", "FAMILIES", "FLUX_ENCODERS", "Planned", "check_widths", "describe", "plan_single", "plan_text_encoders",
           "write_text_encoders"]
