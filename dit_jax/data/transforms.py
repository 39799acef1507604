"""Image preprocessing of facebookresearch/DiT's train.py: ADM centre crop, horizontal flip, scale to [-1, 1].

DiT's pipeline is ``center_crop_arr -> RandomHorizontalFlip -> ToTensor -> Normalize(0.5, 0.5)``; ToTensor and
Normalize together map a uint8 value v to v / 127.5 - 1, which is what :func:`preprocess` computes.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
  """ADM's centre crop (guided-diffusion ``image_datasets.py``): a square ``image_size`` PIL image.

  1. While the short side is at least 2 * image_size, halve both sides (floor) with a BOX filter.
  2. BICUBIC-resize so that the short side is image_size; each side is round(side * scale) (Python rounding).
  3. Crop the centre, offset (H - S) // 2 and (W - S) // 2.
  """
  image = pil_image
  while min(image.size) >= 2 * image_size:
    image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
  scale = image_size / min(image.size)
  image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
  arr = np.asarray(image)
  top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
  return Image.fromarray(arr[top:top + image_size, left:left + image_size])


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """uint8 (H, W, C) -> (H, W, channels): grey is repeated to RGB; RGB becomes grey with PIL's "L" (ITU-R 601-2
  luma); 4 channels (RGBA) drop alpha. channels = 0 keeps 1 or 3 channels as they are."""
  c = image.shape[-1]
  if c == 4:
    image, c = image[..., :3], 3
  if channels in (0, c):
    return image
  if channels == 3 and c == 1:
    return np.repeat(image, 3, axis=-1)
  if channels == 1 and c == 3:
    return np.asarray(Image.fromarray(image, "RGB").convert("L"))[..., None]
  raise ValueError(f"cannot convert an image with {c} channels to {channels} channels")


def preprocess(image: np.ndarray, image_size: int, flip: bool, channels: int = 0) -> np.ndarray:
  """uint8 (H, W, C) -> float32 (S, S, C') in [-1, 1]: channel conversion (see :func:`to_channels`), ADM crop
  (skipped when the image is already S x S), optional horizontal flip, then v / 127.5 - 1."""
  image = to_channels(np.asarray(image, np.uint8), channels)
  if image.shape[:2] != (image_size, image_size):
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    image = np.asarray(center_crop_arr(pil, image_size)).reshape(image_size, image_size, image.shape[-1])
  if flip:
    image = image[:, ::-1]
  return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
