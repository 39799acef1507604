"""Pre-encoded VAE latents (``tools/encode_latents.py``) as a training source that still draws a fresh flip and a
fresh posterior sample every time an item is used.

Directory layout::

  manifest.json       {"format", "num_examples", "shard_size", "num_shards", "shards_done", "complete",
                       "latent_shape": [h, w, C], "dtype", "vae": VAEConfig dict, "vae_spec", "image_size",
                       "num_classes", "source"}
  shard_00000.npz     uncompressed: mean, std (n, 2, h, w, C) dtype; label int64 (n,); index int64 (n,)

View 0 of mean / std is the posterior of the ADM-cropped image, view 1 that of its horizontal flip; std is
exp(0.5 * clamped logvar). Shard k holds items [k * shard_size, (k + 1) * shard_size). An item that could not be
decoded when encoding has label -1 and reads as CorruptImage, so the Loader skips it as it skips a bad image.

In epoch e, item i uses view v = the Loader's flip(e, i) and eps ~ N(0, I) from ``default_rng([seed, e, i, 1])``:
``z = scaling_factor * (mean[v] + std[v] * eps - shift_factor)``, a function of (seed, epoch, index) only.

Shards without ``std`` hold deterministic samples (the teacher samples of :mod:`dit_jax.distill.teacher_data`,
manifest ``vae`` scale 1, shift 0): item i of view v is ``mean[v]`` itself, no posterior draw.
"""
from __future__ import annotations

import collections
import json
import mmap
import os
import pathlib
import threading
import zipfile

import numpy as np

from dit_jax.data.sources import CorruptImage

FORMAT = "dit_jax.latents/1"
MANIFEST = "manifest.json"


def shard_name(k: int) -> str:
  return f"shard_{k:05d}.npz"


def write_atomic(path: pathlib.Path, write) -> None:
  """``write(file)`` into a hidden temp file beside ``path``, fsync, then rename over ``path``."""
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  with open(tmp, "wb") as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_manifest(root: pathlib.Path, manifest: dict) -> None:
  """The manifest, written atomically (after the shards it names)."""
  write_atomic(root / MANIFEST, lambda f: f.write((json.dumps(manifest, indent=1) + "\n").encode()))


def read_manifest(root: str | pathlib.Path) -> dict:
  """The manifest of a latent directory; one-line errors for a missing or unfinished one."""
  path = pathlib.Path(root) / MANIFEST
  if not path.exists():
    raise FileNotFoundError(f"{root} has no {MANIFEST}: not a latent directory (make one with "
                            f"tools/encode_latents.py)")
  manifest = json.loads(path.read_text())
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path} is not a {FORMAT} manifest (format {manifest.get('format')!r})")
  return manifest


def npz_layout(path: str | pathlib.Path) -> dict[str, tuple]:
  """name -> (byte offset, shape, dtype, order) of every array of an uncompressed .npz (as ``np.savez`` writes)."""
  out = {}
  with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
    for info in zf.infolist():
      if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{path}: {info.filename} is compressed; latent shards must be written with np.savez")
      f.seek(info.header_offset)
      local = f.read(30)
      f.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little"))
      version = np.lib.format.read_magic(f)
      read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
      shape, fortran, dtype = read_header(f)
      out[info.filename.removesuffix(".npy")] = (f.tell(), shape, dtype, "F" if fortran else "C")
  return out


def npz_memmap(path: str | pathlib.Path, layout: dict | None = None) -> dict[str, np.ndarray]:
  """Every array of an uncompressed .npz as a read-only view of one memory map of the file."""
  with open(path, "rb") as f:
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  return {name: np.ndarray(shape, dtype, buffer=buf, offset=offset, order=order)
          for name, (offset, shape, dtype, order) in (layout or npz_layout(path)).items()}


class LatentSource:
  """Random access over latent shards: ``source[i] -> {"mean": (2, h, w, C), "std": (2, h, w, C), "label": int}``
  (no "std" for deterministic samples).

  Shards are memory-mapped on first use; at most ``max_open`` maps stay open (LRU, one file descriptor each).
  ``transform`` is the Loader's per-item hook: float32 (h, w, C) scaled latents (see the module docstring).
  """

  def __init__(self, root: str | pathlib.Path, max_open: int = 64):
    self.root = pathlib.Path(root)
    m = self.manifest = read_manifest(self.root)
    done = set(m.get("shards_done", ()))
    if not m.get("complete") or len(done) != m["num_shards"]:
      raise ValueError(f"{self.root} is unfinished ({len(done)} of {m['num_shards']} shards encoded): re-run "
                       f"tools/encode_latents.py with the same arguments to finish it")
    self.num_examples, self.shard_size = int(m["num_examples"]), int(m["shard_size"])
    self.num_classes = int(m["num_classes"])
    self.item_shape = tuple(int(d) for d in m["latent_shape"])
    self.channels = self.item_shape[-1]
    self.scaling_factor = float(m["vae"]["scaling_factor"])
    self.shift_factor = float(m["vae"].get("shift_factor", 0.0))
    self.max_open = max_open
    self._open: collections.OrderedDict[int, dict] = collections.OrderedDict()
    self._layouts: dict[int, dict] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self.num_examples

  def shard(self, k: int) -> dict[str, np.ndarray]:
    """The arrays of shard k (memory maps), via the LRU."""
    with self._lock:
      if k in self._open:
        self._open.move_to_end(k)
        return self._open[k]
    path = self.root / shard_name(k)
    if k not in self._layouts:  # parsed once; small, kept for every shard
      self._layouts[k] = npz_layout(path)
    arrays = npz_memmap(path, self._layouts[k])
    with self._lock:
      self._open[k] = arrays
      while len(self._open) > self.max_open:
        self._open.popitem(last=False)
    return arrays

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < self.num_examples:
      raise IndexError(f"item {i} out of range [0, {self.num_examples})")
    k, r = divmod(int(i), self.shard_size)
    s = self.shard(k)
    label = int(s["label"][r])
    if label < 0:
      raise CorruptImage(f"item {i} could not be decoded when the latents were encoded")
    item = {"mean": np.asarray(s["mean"][r]), "label": label}
    if "std" in s:  # else a deterministic sample (no posterior)
      item["std"] = np.asarray(s["std"][r])
    return item

  def transform(self, item: dict, *, flip: bool, seed: int, epoch: int, index: int) -> np.ndarray:
    """A fresh scaled latent sample of view ``flip``: float32 (h, w, C)."""
    v = int(flip)
    z = item["mean"][v].astype(np.float32)
    if "std" in item:
      eps = np.random.default_rng([seed, epoch, index, 1]).standard_normal(self.item_shape, np.float32)
      z = z + item["std"][v].astype(np.float32) * eps
    return (z - np.float32(self.shift_factor)) * np.float32(self.scaling_factor)
