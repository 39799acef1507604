"""Random-access, host-local image sources: ``len(source)`` and ``source[i] -> {"image": uint8 (H, W, C),
"label": int}``, with C = 1 or 3. Unreadable items raise :class:`CorruptImage` when read.

Each source also has ``num_classes`` and ``channels`` (the channel count images are stored with; for a folder,
that of its first readable image).
"""
from __future__ import annotations

import io
import logging
import os
import pathlib

import numpy as np
from PIL import Image

logger = logging.getLogger("dit_jax")

# torchvision's IMG_EXTENSIONS (ImageFolder, which DiT's train.py uses), compared case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class CorruptImage(Exception):
  """An item that cannot be decoded. The loader skips it."""


def decode_image(data: bytes | str | os.PathLike, name: str = "") -> np.ndarray:
  """Encoded bytes or a file path -> uint8 (H, W, 1) for grey images, (H, W, 3) for everything else.

  Grey modes ("1", "L", "LA") stay 1 channel; any other mode (palette, RGBA, CMYK, ...) is converted to RGB as
  ImageFolder's loader does. Raises CorruptImage, naming the item, for anything PIL cannot read."""
  try:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
      image.load()
      if image.mode not in ("L", "RGB"):
        image = image.convert("L" if image.mode in ("1", "LA") else "RGB")
      arr = np.asarray(image, np.uint8)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    reason = " ".join(str(e).split()) or type(e).__name__
    raise CorruptImage(reason if name and name in reason else f"{name or 'image'}: {reason}") from e
  return arr[..., None] if arr.ndim == 2 else arr


class DigitsSource:
  """scikit-learn's bundled 8x8 handwritten digits (1797 images, classes 0..9; no download).

  Values 0..16 are scaled to uint8 as round(v * 255 / 16); images are (8, 8, 1)."""

  num_classes = 10
  channels = 1

  def __init__(self):
    from sklearn.datasets import load_digits

    digits = load_digits()
    self.images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    self.labels = digits.target.astype(np.int64)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict:
    return {"image": self.images[i], "label": int(self.labels[i])}


class FolderSource:
  """An ImageFolder tree: ``root/<class>/**/<image>``. Sorted class folder names get ids 0..K-1 (``classes``);
  files are listed in torchvision ImageFolder's order and decoded lazily, so a corrupt file raises CorruptImage
  only when it is read."""

  def __init__(self, root: str | os.PathLike, extensions: tuple[str, ...] = IMAGE_EXTENSIONS):
    root = pathlib.Path(root)
    if not root.is_dir():
      raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    self.root = root
    self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    self.paths, labels = [], []
    for label, name in enumerate(self.classes):
      before = len(self.paths)
      for dirpath, _, files in sorted(os.walk(root / name, followlinks=True)):
        self.paths += [os.path.join(dirpath, f) for f in sorted(files) if f.lower().endswith(extensions)]
      labels += [label] * (len(self.paths) - before)
      if len(self.paths) == before:
        logger.warning("class folder %s has no images", root / name)
    if not self.paths:
      raise FileNotFoundError(f"no images ({', '.join(extensions)}) in class subfolders of {str(root)!r}")
    self.labels = np.asarray(labels, np.int64)
    self._channels = None

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  @property
  def channels(self) -> int:
    """Channels of the first readable image (1 or 3)."""
    if self._channels is None:
      self._channels = first_readable(self)["image"].shape[-1]
    return self._channels

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> dict:
    return {"image": decode_image(self.paths[i], self.paths[i]), "label": int(self.labels[i])}


def first_readable(source) -> dict:
  """The first item of a source, in index order, that is not corrupt."""
  for i in range(len(source)):
    try:
      return source[i]
    except CorruptImage:
      continue
  raise CorruptImage(f"all {len(source)} items of {type(source).__name__} are corrupt")
