"""Training data: random-access image sources, DiT's preprocessing and a deterministic multi-host loader.

  loader = data.make_loader(data.default_data_config(), global_batch_size=256, seed=0,
                            process_index=jax.process_index(), process_count=jax.process_count())
  batch = next(loader)      # {"image": float32 (256 / P, S, S, C) in [-1, 1], "label": int32 (256 / P,)}
  state = loader.get_state()  # JSON ints; loader.set_state(state) resumes exactly

Sources (``len``, ``source[i] -> {"image": uint8 (H, W, C), "label": int}``): DigitsSource (scikit-learn's 8x8
digits, the embedded demo), FolderSource (ImageFolder layout), TfdsSource (any prepared TFDS image dataset).
LatentSource (source "latents") reads VAE latent shards of ``tools/encode_latents.py`` and serves scaled latents
(h, w, C) with a fresh flip and posterior sample per use; image_size is then unused.

MMDiT conditioning (``data.conditioning``): "text" joins text-embedding shards (``data.text_folder``, see
:mod:`dit_jax.data.text_embeddings`) row by row with the source; "class_tokens" maps each label to a fixed seeded
context / pooled pair. Batches then also hold "context" (B, L, Dc) and "pooled" (B, Dp), float32.
"""
from __future__ import annotations

import ml_collections

from dit_jax.data.latents import LatentSource
from dit_jax.data.loader import Loader
from dit_jax.data.sources import CorruptImage, DigitsSource, FolderSource, decode_image
from dit_jax.data.text_embeddings import (
  ClassTokens,
  ConditionedSource,
  TextEmbeddings,
  class_tokens_from_spec,
  write_text_embedding_shards,
)
from dit_jax.data.tfds_source import TfdsSource
from dit_jax.data.transforms import center_crop_arr, preprocess

SOURCES = ("digits", "folder", "tfds", "latents")
CONDITIONINGS = ("label", "text", "class_tokens")

__all__ = ["CONDITIONINGS", "SOURCES", "ClassTokens", "ConditionedSource", "CorruptImage", "DigitsSource",
           "FolderSource", "LatentSource", "Loader", "TextEmbeddings", "TfdsSource", "center_crop_arr",
           "class_tokens_from_spec", "decode_image", "default_data_config", "make_conditioning",
           "make_loader", "make_source", "num_classes_of", "preprocess", "write_text_embedding_shards"]


def default_data_config() -> ml_collections.ConfigDict:
  """The data section of a training config: the digits demo at 8x8, without flips (a flipped digit is another
  symbol). Empty strings mean "not set". For ImageNet as in DiT: source "folder" (or "tfds" with name
  "imagenet2012"), image_size 256, random_flip True; or source "latents" with folder = a latent directory."""
  return ml_collections.ConfigDict({
      "source": "digits",   # "digits" | "folder" | "tfds" | "latents"
      "name": "",           # TFDS dataset name, e.g. "imagenet2012"
      "split": "train",     # TFDS split, slices allowed ("train[:10%]")
      "data_dir": "",       # TFDS data_dir ("" = TFDS's default)
      "manual_dir": "",     # TFDS manual download dir; given and not prepared -> prepare (array_record)
      "download": False,    # TFDS: download and prepare when not prepared
      "folder": "",         # ImageFolder root for source "folder"; latent directory for source "latents"
      "image_size": 8,
      "random_flip": False,
      "shuffle": True,
      "channels": 0,        # 0 = as stored, or force 1 / 3
      "num_workers": -1,    # decoding threads; -1 = min(8, cpu count), 0 = none
      "conditioning": "label",  # "label" (DiT) | "text" | "class_tokens" (MMDiT: adds context / pooled)
      "text_folder": "",    # text-embedding directory for conditioning "text" (row i = item i)
      "class_token_length": 4,  # conditioning "class_tokens": L context tokens per class ...
      "class_token_seed": 0,    # ... drawn once from this seed
  })


def make_source(data_config):
  """The source a data config names."""
  source = data_config.source
  if source == "digits":
    return DigitsSource()
  if source == "folder":
    if not data_config.get("folder"):
      raise ValueError("data.source 'folder' needs data.folder (the ImageFolder root)")
    return FolderSource(data_config.folder)
  if source == "tfds":
    if not data_config.get("name"):
      raise ValueError("data.source 'tfds' needs data.name (a TFDS dataset name)")
    return TfdsSource(data_config.name, split=data_config.get("split") or "train",
                      data_dir=data_config.get("data_dir") or None, manual_dir=data_config.get("manual_dir") or None,
                      download=bool(data_config.get("download", False)))
  if source == "latents":
    if not data_config.get("folder"):
      raise ValueError("data.source 'latents' needs data.folder (a directory written by tools/encode_latents.py)")
    return LatentSource(data_config.folder)
  raise ValueError(f"unknown data.source {source!r}; choose one of {', '.join(SOURCES)}")


def make_conditioning(data_config, source, context_dim: int = 0, pooled_dim: int = 0):
  """The TextEmbeddings or ClassTokens a data config asks for (None for "label"); dims are the MMDiT's
  joint_attention_dim / pooled_projection_dim, checked against the text shards."""
  conditioning = data_config.get("conditioning", "label")
  if conditioning == "label":
    return None
  if conditioning == "text":
    if not data_config.get("text_folder"):
      raise ValueError("data.conditioning 'text' needs data.text_folder (a text-embedding directory)")
    text = TextEmbeddings(data_config.text_folder)
    got = (text.context_shape[-1], text.pooled_dim)
    if context_dim and got != (context_dim, pooled_dim or got[1]):
      raise ValueError(f"text embeddings in {data_config.text_folder} have context dim {got[0]} and pooled dim "
                       f"{got[1]}; the model expects {context_dim} and {pooled_dim}")
    return text
  if conditioning == "class_tokens":
    return ClassTokens(num_classes_of(source), data_config.class_token_length, context_dim, pooled_dim,
                       data_config.class_token_seed)
  raise ValueError(f"unknown data.conditioning {conditioning!r}; choose one of {', '.join(CONDITIONINGS)}")


def make_loader(data_config, *, global_batch_size: int, seed: int, process_index: int = 0,
                process_count: int = 1, context_dim: int = 0, pooled_dim: int = 0) -> Loader:
  """Source and Loader from a data config (see :func:`default_data_config`); context_dim / pooled_dim size the
  MMDiT conditioning when ``data.conditioning`` is not "label"."""
  workers = data_config.get("num_workers", -1)
  source = make_source(data_config)
  cond = make_conditioning(data_config, source, context_dim, pooled_dim)
  if cond is not None:
    source = ConditionedSource(source, cond)
  return Loader(source, global_batch_size=global_batch_size, seed=seed,
                image_size=data_config.image_size, process_index=process_index, process_count=process_count,
                shuffle=data_config.get("shuffle", True), random_flip=data_config.random_flip,
                channels=data_config.get("channels", 0), num_workers=None if workers < 0 else workers)


def num_classes_of(source) -> int:
  """Number of classes of a source (or of a Loader's source)."""
  source = getattr(source, "source", source)
  if getattr(source, "num_classes", None) is None:
    raise ValueError(f"{type(source).__name__} does not say how many classes it has (no num_classes)")
  return int(source.num_classes)
