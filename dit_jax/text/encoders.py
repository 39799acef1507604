"""The text encoders of SD3 (CLIP-L, CLIP-G, T5) or FLUX.1 (CLIP-L, T5) with their tokenizers, bundled in a model
directory:

    <model>/text_encoders/clip_l/   a dit_jax checkpoint (kind clip_text) + tokenizer/ (the tokenizer's files)
    <model>/text_encoders/clip_g/   the same (with text_projection); SD3 only
    <model>/text_encoders/t5xxl/    kind t5_encoder + tokenizer/ (optional for SD3, required by FLUX)
"""
from __future__ import annotations

import dataclasses
import os
import pathlib

from flax import nnx

from dit_jax import checkpoint
from dit_jax.text import tokenizers

BUNDLED = "text_encoders"
NAMES = ("clip_l", "clip_g", "t5xxl")
TOKENIZER = "tokenizer"
FAMILIES = ("sd3", "flux")
HOW_TO_ADD = ("convert an SD3 / FluxPipeline folder or single file that has them, or add them with "
              "tools/convert_torch.py SRC OUT --text-encoders DIR")


@dataclasses.dataclass
class TextEncoders:
  """CLIP-L, CLIP-G (with projection; None in a FLUX bundle) and T5 (None: SD3 without T5), each with its
  tokenizer. SD3 uses all three, FLUX.1 CLIP-L and T5 (an SD3 bundle with T5 conditions FLUX too)."""

  clip_l: nnx.Module
  clip_g: nnx.Module | None
  t5: nnx.Module | None
  tokenizers: dict  # "clip_l" / "clip_g" / "t5" -> tokenizer

  @property
  def clip_layers(self) -> int:
    return min(m.config.num_hidden_layers for m in (self.clip_l, self.clip_g) if m is not None)

  def require(self, family: str) -> None:
    """One-line ValueError unless these encoders can condition ``family`` ('sd3': CLIP-G; 'flux': T5)."""
    if family not in FAMILIES:
      raise ValueError(f"unknown text-encoder family {family!r}: use one of {', '.join(FAMILIES)}")
    if family == "sd3" and self.clip_g is None:
      raise ValueError("SD3 prompts need CLIP-G, and these text encoders (a FLUX bundle?) have CLIP-L and T5 only")
    if family == "flux" and self.t5 is None:
      raise ValueError(f"FLUX prompts need T5, and these text encoders have none: {HOW_TO_ADD}")

  def context_dim(self, default: int | None = None) -> int:
    """The conditioning width: T5's, or without T5 ``default`` (the MMDiT's joint_attention_dim, else 4096)."""
    if self.t5 is not None:
      return self.t5.config.d_model
    return default or 4096

  def check_fits(self, joint_attention_dim: int, pooled_projection_dim: int, family: str = "sd3") -> None:
    """One-line ValueError when the encoders' widths do not fit an MMDiT's (family 'sd3') or a FLUX model's ('flux':
    T5 width = joint_attention_dim, CLIP-L width = pooled_projection_dim)."""
    self.require(family)
    if family == "flux":
      width, pooled = self.t5.config.d_model, self.clip_l.config.hidden_size
      if width != joint_attention_dim:
        raise ValueError(f"the text encoders give {width}-wide context (T5), the FLUX model's joint_attention_dim is "
                         f"{joint_attention_dim}")
      if pooled != pooled_projection_dim:
        raise ValueError(f"the text encoders give a {pooled}-wide pooled vector (CLIP-L), the FLUX model's "
                         f"pooled_projection_dim is {pooled_projection_dim}")
      return
    clip = self.clip_l.config.hidden_size + self.clip_g.config.hidden_size
    width = self.context_dim(joint_attention_dim)
    pooled = self.clip_l.config.hidden_size + (self.clip_g.config.projection_dim or self.clip_g.config.hidden_size)
    if width != joint_attention_dim or clip > joint_attention_dim:
      raise ValueError(f"the text encoders give {width}-wide context (CLIP {clip}), the MMDiT's "
                       f"joint_attention_dim is {joint_attention_dim}")
    if pooled != pooled_projection_dim:
      raise ValueError(f"the text encoders give a {pooled}-wide pooled vector, the MMDiT's pooled_projection_dim "
                       f"is {pooled_projection_dim}")


def encoder_dir(path: str | os.PathLike) -> pathlib.Path:
  """``path`` itself when it holds clip_l/, else ``path/text_encoders``."""
  path = pathlib.Path(path)
  return path if (path / "clip_l").is_dir() else path / BUNDLED


def load_text_encoders(path: str | os.PathLike, dtype=None) -> TextEncoders:
  """The text encoders bundled with a model directory (or a ``text_encoders`` directory itself): CLIP-L with CLIP-G
  and / or T5 (SD3: both CLIPs, FLUX: CLIP-L and T5)."""
  import jax.numpy as jnp

  root = encoder_dir(path)
  dtype = dtype or jnp.float32
  if not (root / "clip_l").is_dir():
    raise checkpoint.CheckpointError(f"{path} has no text encoders ({BUNDLED}/clip_l with clip_g or t5xxl): "
                                     f"{HOW_TO_ADD}")
  if not (root / "clip_g").is_dir() and not (root / "t5xxl").is_dir():
    raise checkpoint.CheckpointError(f"{root} holds clip_l only: SD3 needs clip_g too, FLUX t5xxl ({HOW_TO_ADD})")
  models, toks = {}, {}
  for name, key in zip(NAMES, ("clip_l", "clip_g", "t5")):
    folder = root / name
    if not folder.is_dir():
      continue
    models[key] = checkpoint.load(folder, dtype=dtype)
    reader = tokenizers.T5Tokenizer if key == "t5" else tokenizers.CLIPTokenizer
    if not (folder / TOKENIZER).is_dir():
      raise checkpoint.CheckpointError(f"{folder} has no {TOKENIZER}/ folder: re-convert with the tokenizer files "
                                       "(tools/convert_torch.py ... --tokenizers DIR)")
    toks[key] = reader.from_dir(folder / TOKENIZER)
  return TextEncoders(models["clip_l"], models.get("clip_g"), models.get("t5"), toks)


def save_text_encoders(encoders: TextEncoders, out_dir: str | os.PathLike, *, extra: dict | None = None) -> None:
  """Write ``encoders`` as ``out_dir/{clip_l,clip_g,t5xxl}`` (each a checkpoint with its tokenizer files)."""
  out = pathlib.Path(out_dir)
  for name, key in zip(NAMES, ("clip_l", "clip_g", "t5")):
    model = getattr(encoders, key)
    if model is None:
      continue
    checkpoint.save(model, out / name, overwrite=True, extra=(extra or {}).get(key))
    encoders.tokenizers[key].save(out / name / TOKENIZER)
