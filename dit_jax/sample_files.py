"""Writing samples: PNG grids and ADM-evaluator ``.npz`` files (resumable, per-batch shards), and the VAE decoder
that turns latents into images first.

Images are quantised as facebookresearch/DiT's ``sample_ddp.py``: uint8(clip(127.5 x + 128, 0, 255)).
Batch i always uses PRNG key fold_in(key(seed), i) and, without fixed labels, labels drawn from
default_rng([seed, i]), so an interrupted run that resumes writes exactly what an uninterrupted one would.
"""
from __future__ import annotations

import logging
import math
import os
import pathlib
import shutil
import zipfile
from typing import Callable

import jax
import numpy as np
from flax import nnx
from PIL import Image
from tqdm.auto import tqdm

from dit_jax.diffusion.samplers import sample

logger = logging.getLogger("dit_jax")

Decoder = Callable[[jax.Array], jax.Array]  # latents (B, h, w, C) -> images (B, H, W, 3) in [-1, 1]


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8 exactly as sample_ddp.py (truncation after clamping)."""
  return np.clip(127.5 * np.asarray(images, np.float32) + 128.0, 0, 255).astype(np.uint8)


def displayable(images: np.ndarray) -> np.ndarray:
  """uint8 (N, H, W, C) -> 1 or 3 channels; model-space latents with C > 3 show their first three channels."""
  c = images.shape[-1]
  if c in (1, 3):
    return images
  logger.warning("no VAE: showing the first 3 of %d latent channels", c)
  return images[..., :3] if c > 3 else images[..., :1]


def image_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
  """(N, H, W, C) uint8 -> one (rows*(H+p)+p, nrow*(W+p)+p, C) grid with black padding."""
  n, h, w, c = images.shape
  nrow = nrow or math.ceil(math.sqrt(n))
  rows = math.ceil(n / nrow)
  grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, nrow)
    y, x = padding + r * (h + padding), padding + col * (w + padding)
    grid[y:y + h, x:x + w] = img
  return grid


def _atomic_write(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
  """np.savez with fixed zip timestamps, so the same arrays always give the same bytes."""
  def write(p: pathlib.Path) -> None:
    with zipfile.ZipFile(p, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
      for name, array in arrays.items():
        info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
        with zf.open(info, "w", force_zip64=True) as f:
          np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)

  _atomic_write(pathlib.Path(path), write)


def save_png(path: str | os.PathLike, grid: np.ndarray) -> None:
  path = pathlib.Path(path)
  image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  _atomic_write(path, lambda p: image.save(p, format="PNG"))


def vae_decoder(vae) -> Decoder:
  """A jitted decoder from the diffusion model's (scaled) latents to images in [-1, 1]."""
  graphdef, state = nnx.split(vae)

  @jax.jit
  def decode(state, latents):
    model = nnx.merge(graphdef, state)
    return jax.numpy.clip(model.decode(model.unscale_latents(latents)).astype(jax.numpy.float32), -1.0, 1.0)

  return lambda latents: decode(state, latents)


def generate_batch(model, labels: np.ndarray, seed: int, batch_index: int, decode: Decoder | None = None,
                   **sample_kwargs) -> np.ndarray:
  """Sample one batch (deterministic in seed and batch index) and return uint8 images."""
  key = jax.random.fold_in(jax.random.key(seed), batch_index)
  latents = sample(model, labels, key, **sample_kwargs)
  images = decode(latents) if decode is not None else latents
  return to_uint8(jax.device_get(images))


def batch_labels(num_classes: int, seed: int, batch_index: int, size: int, fixed: np.ndarray | None) -> np.ndarray:
  """Labels of batch i: the fixed list cycled, else uniform over classes (as sample_ddp.py)."""
  if fixed is not None:
    start = batch_index * size
    return fixed[np.arange(start, start + size) % len(fixed)]
  return np.random.default_rng([seed, batch_index]).integers(0, num_classes, size)


def sample_to_npz(model, out: str | os.PathLike, num_samples: int, batch_size: int, seed: int = 0, *,
                  labels: np.ndarray | None = None, decode: Decoder | None = None, progress: bool = True,
                  keep_shards: bool = False, **sample_kwargs) -> pathlib.Path:
  """Write ``num_samples`` images to ``out`` (``arr_0`` uint8 NHWC, ``labels``), resuming from finished shards.

  Shards live in ``<out>.shards/`` (one ``.npz`` per batch, written atomically) until the final file is written.
  """
  out = pathlib.Path(out)
  shard_dir = out.with_name(out.name + ".shards")
  shard_dir.mkdir(parents=True, exist_ok=True)
  num_batches = math.ceil(num_samples / batch_size)
  done = sum((shard_dir / f"{i:06d}.npz").exists() for i in range(num_batches))
  if done:
    logger.info("resuming: %d of %d batches already in %s", done, num_batches, shard_dir)
  for i in tqdm(range(num_batches), desc="sampling", unit="batch", disable=not progress):
    shard = shard_dir / f"{i:06d}.npz"
    if shard.exists():
      continue
    y = batch_labels(model.config.num_classes, seed, i, batch_size, labels)
    images = generate_batch(model, y, seed, i, decode, **sample_kwargs)
    save_npz(shard, arr_0=images, labels=y)
  parts = [np.load(shard_dir / f"{i:06d}.npz") for i in range(num_batches)]
  arr = np.concatenate([p["arr_0"] for p in parts])[:num_samples]
  all_labels = np.concatenate([p["labels"] for p in parts])[:num_samples]
  save_npz(out, arr_0=arr, labels=all_labels)
  if not keep_shards:
    shutil.rmtree(shard_dir)  # finished shards and any temporaries an interrupted write left behind
  return out
