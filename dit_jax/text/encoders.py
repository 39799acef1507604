"""SD3's three text encoders with their tokenizers, bundled in a model directory:

    <model>/text_encoders/clip_l/   a dit_jax checkpoint (kind clip_text) + tokenizer/ (the tokenizer's files)
    <model>/text_encoders/clip_g/   the same (with text_projection)
    <model>/text_encoders/t5xxl/    kind t5_encoder + tokenizer/ (optional: SD3 runs without T5)
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
HOW_TO_ADD = ("convert an SD3 pipeline folder or single file that has them, or add them with "
              "tools/convert_torch.py SRC OUT --text-encoders DIR")


@dataclasses.dataclass
class TextEncoders:
  """CLIP-L, CLIP-G (with projection) and optionally T5, each with its tokenizer."""

  clip_l: nnx.Module
  clip_g: nnx.Module
  t5: nnx.Module | None
  tokenizers: dict  # "clip_l" / "clip_g" / "t5" -> tokenizer

  @property
  def clip_layers(self) -> int:
    return min(self.clip_l.config.num_hidden_layers, self.clip_g.config.num_hidden_layers)

  def context_dim(self, default: int | None = None) -> int:
    """The conditioning width: T5's, or without T5 ``default`` (the MMDiT's joint_attention_dim, else 4096)."""
    if self.t5 is not None:
      return self.t5.config.d_model
    return default or 4096

  def check_fits(self, joint_attention_dim: int, pooled_projection_dim: int) -> None:
    """One-line ValueError when the encoders' widths do not fit an MMDiT's."""
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
  """``path`` itself when it holds clip_l/ and clip_g/, else ``path/text_encoders``."""
  path = pathlib.Path(path)
  return path if (path / "clip_l").is_dir() else path / BUNDLED


def load_text_encoders(path: str | os.PathLike, dtype=None) -> TextEncoders:
  """The text encoders bundled with a model directory (or a ``text_encoders`` directory itself)."""
  import jax.numpy as jnp

  root = encoder_dir(path)
  dtype = dtype or jnp.float32
  if not (root / "clip_l").is_dir() or not (root / "clip_g").is_dir():
    raise checkpoint.CheckpointError(f"{path} has no text encoders ({BUNDLED}/clip_l and clip_g): {HOW_TO_ADD}")
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
  return TextEncoders(models["clip_l"], models["clip_g"], models.get("t5"), toks)


def save_text_encoders(encoders: TextEncoders, out_dir: str | os.PathLike, *, extra: dict | None = None) -> None:
  """Write ``encoders`` as ``out_dir/{clip_l,clip_g,t5xxl}`` (each a checkpoint with its tokenizer files)."""
  out = pathlib.Path(out_dir)
  for name, key in zip(NAMES, ("clip_l", "clip_g", "t5")):
    model = getattr(encoders, key)
    if model is None:
      continue
    checkpoint.save(model, out / name, overwrite=True, extra=(extra or {}).get(key))
    encoders.tokenizers[key].save(out / name / TOKENIZER)
