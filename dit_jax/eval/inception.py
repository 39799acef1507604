"""The FID Inception-v3 (inception-2015-12-05, as the TF1 graph behind TTUR / the ADM evaluator) in Flax NNX, NHWC.

Topology of pytorch-fid's ``fid_inception_v3`` and torch-fidelity's ``FeatureExtractorInceptionV3``: torchvision's
Inception3 with BatchNorm eps 1e-3, average pools in Mixed_5b..5d, 6b..6e and 7b that leave the padding out of the
mean, and a *max* pool in Mixed_7c's pool branch. Module names follow the torch state dict, so the key table
(:mod:`dit_jax.convert.inception_tables`) reads one-to-one.

Preprocessing is the graph's own: images (B, H, W, 3) in [0, 255] (uint8 or float) are resized to 299 x 299 by TF1's
legacy bilinear resize, written exactly as two interpolation matrices (:func:`tf1_resize_matrix`), then
x = (x - 128) / 128. Outputs (ADM's tensors):

  pool3    (B, 2048)  ``pool_3:0``, the global average of Mixed_7c
  spatial  (B, 2023)  ``mixed_6/conv:0`` = Mixed_6d.branch1x1, first 7 channels, flattened in (H, W, C) order
  logits   (B, 1008)  pool3 @ W of ``softmax/logits/MatMul`` (no bias, as ADM's Inception Score)

Everything runs in float32 with ``Precision.HIGHEST`` convolutions and dots, whatever the global default.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.models.config import JsonConfig, check_all
from dit_jax.models.layers import logical

BN_EPS = 1e-3
HIGHEST = jax.lax.Precision.HIGHEST
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]


@dataclasses.dataclass(frozen=True)
class InceptionConfig(JsonConfig):
  """The FID Inception-v3: ``num_classes`` logits (1008 for inception-2015-12-05), input resized to ``image_size``."""

  num_classes: int = 1008
  image_size: int = 299

  def __post_init__(self):
    check_all([(self.num_classes > 0, f"num_classes {self.num_classes} must be positive"),
               (self.image_size >= 75, f"image_size {self.image_size} is below Inception-v3's minimum 75")],
              "invalid Inception config")


# ---------------------------------------------------------------------------------------------------------------
# TF1 legacy bilinear resize and preprocessing


@functools.lru_cache(maxsize=64)
def tf1_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float32 matrix of TF1's ``resize_bilinear(align_corners=False)`` along one axis.

  TF1 (no half-pixel centres): src = o * (in / out) in float32, lo = floor(src), hi = min(lo + 1, in - 1),
  out[o] = (1 - (src - lo)) * x[lo] + (src - lo) * x[hi].
  """
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo.astype(np.float32)
  m = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(m, (rows, lo), 1 - frac)
  np.add.at(m, (rows, hi), frac)
  return m


def tf1_resize(images: jax.Array, size: tuple[int, int]) -> jax.Array:
  """TF1 legacy bilinear resize: (B, H, W, C) -> (B, size[0], size[1], C) float32 = Wy @ image @ Wx^T."""
  x = images.astype(jnp.float32)
  wy = jnp.asarray(tf1_resize_matrix(x.shape[1], size[0]))
  wx = jnp.asarray(tf1_resize_matrix(x.shape[2], size[1]))
  x = jnp.einsum("oh,bhwc->bowc", wy, x, precision=HIGHEST)
  return jnp.einsum("pw,bowc->bopc", wx, x, precision=HIGHEST)


def preprocess(images: jax.Array, image_size: int = 299) -> jax.Array:
  """Images (B, H, W, 3) in [0, 255], uint8 or float -> the network input (B, 299, 299, 3): resize, (x - 128) / 128."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"Inception expects (B, H, W, 3) NHWC images in [0, 255], got shape {tuple(images.shape)}")
  if not (jnp.issubdtype(images.dtype, jnp.floating) or images.dtype == jnp.uint8):
    raise ValueError(f"Inception expects uint8 or float images in [0, 255], got dtype {images.dtype}")
  return (tf1_resize(images, (image_size, image_size)) - 128.0) / 128.0


# ---------------------------------------------------------------------------------------------------------------
# Layers


def max_pool(x: jax.Array, stride: int, pad: int = 0) -> jax.Array:
  """3x3 max pool (padding with -inf, as torch's max_pool2d)."""
  p = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), p)


def avg_pool_no_pad(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average pool with padding 1 whose mean leaves the padding out (TF's, count_include_pad=False)."""
  p = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), p)
  ones = np.ones((1, x.shape[1], x.shape[2], 1), np.float32)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), p)
  return total / count


class BatchNorm(nnx.Module):
  """Inference BatchNorm over the channel axis: (x - mean) * scale / sqrt(var + 1e-3) + bias."""

  def __init__(self, channels: int, *, param_dtype):
    self.scale = nnx.Param(jnp.ones((channels,), param_dtype), **logical(None))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype), **logical(None))
    self.mean = nnx.Param(jnp.zeros((channels,), param_dtype), **logical(None))
    self.var = nnx.Param(jnp.ones((channels,), param_dtype), **logical(None))

  def __call__(self, x: jax.Array) -> jax.Array:
    f32 = lambda v: v[...].astype(jnp.float32)
    return (x - f32(self.mean)) * (f32(self.scale) * jax.lax.rsqrt(f32(self.var) + BN_EPS)) + f32(self.bias)


class Conv(nnx.Module):
  """Bias-free convolution, HWIO kernel, torch's symmetric padding: (B, H, W, C_in) -> (B, H', W', C_out)."""

  def __init__(self, c_in: int, c_out: int, kernel, stride: int, padding, rngs: nnx.Rngs, *, param_dtype):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    self.stride = stride
    self.padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
    init = nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(init(rngs.params(), (kh, kw, c_in, c_out), param_dtype), **logical(None, None, None, None))

  def __call__(self, x: jax.Array) -> jax.Array:
    (ph, pw), s = self.padding, self.stride
    return jax.lax.conv_general_dilated(x, self.kernel[...].astype(jnp.float32), (s, s), ((ph, ph), (pw, pw)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST,
                                        preferred_element_type=jnp.float32)


class BasicConv2d(nnx.Module):
  """conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU."""

  def __init__(self, c_in: int, c_out: int, rngs: nnx.Rngs, *, kernel, stride: int = 1, padding=0, param_dtype):
    self.conv = Conv(c_in, c_out, kernel, stride, padding, rngs, param_dtype=param_dtype)
    self.bn = BatchNorm(c_out, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


def _cat(*xs: jax.Array) -> jax.Array:
  return jnp.concatenate(xs, axis=-1)


class InceptionA(nnx.Module):
  """Mixed_5b/5c/5d (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool(no pad)-1x1."""

  def __init__(self, c_in: int, pool_features: int, rngs: nnx.Rngs, *, param_dtype):
    c = lambda i, o, k, p=0: BasicConv2d(i, o, rngs, kernel=k, padding=p, param_dtype=param_dtype)
    self.branch1x1 = c(c_in, 64, 1)
    self.branch5x5_1, self.branch5x5_2 = c(c_in, 48, 1), c(48, 64, 5, 2)
    self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3 = c(c_in, 64, 1), c(64, 96, 3, 1), c(96, 96, 3, 1)
    self.branch_pool = c(c_in, pool_features, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return _cat(self.branch1x1(x), b5, b3, self.branch_pool(avg_pool_no_pad(x)))


class InceptionB(nnx.Module):
  """Mixed_6a (35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

  def __init__(self, c_in: int, rngs: nnx.Rngs, *, param_dtype):
    c = lambda i, o, k, s=1, p=0: BasicConv2d(i, o, rngs, kernel=k, stride=s, padding=p, param_dtype=param_dtype)
    self.branch3x3 = c(c_in, 384, 3, 2)
    self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3 = c(c_in, 64, 1), c(64, 96, 3, 1, 1), c(96, 96, 3, 2)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return _cat(self.branch3x3(x), b3, max_pool(x, 2))


class InceptionC(nnx.Module):
  """Mixed_6b..6e (17x17), factorised 7x7: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool(no pad)-1x1.
  Returns (output, branch1x1 output): Mixed_6d's branch1x1 is ADM's ``mixed_6/conv``."""

  def __init__(self, c_in: int, c7: int, rngs: nnx.Rngs, *, param_dtype):
    c = lambda i, o, k, p=0: BasicConv2d(i, o, rngs, kernel=k, padding=p, param_dtype=param_dtype)
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))
    self.branch1x1 = c(c_in, 192, 1)
    self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = c(c_in, c7, 1), c(c7, c7, *row), c(c7, 192, *col)
    self.branch7x7dbl_1 = c(c_in, c7, 1)
    self.branch7x7dbl_2, self.branch7x7dbl_3 = c(c7, c7, *col), c(c7, c7, *row)
    self.branch7x7dbl_4, self.branch7x7dbl_5 = c(c7, c7, *col), c(c7, 192, *row)
    self.branch_pool = c(c_in, 192, 1)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    d = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
    d = self.branch7x7dbl_5(self.branch7x7dbl_4(d))
    return _cat(b1, b7, d, self.branch_pool(avg_pool_no_pad(x))), b1


class InceptionD(nnx.Module):
  """Mixed_7a (17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

  def __init__(self, c_in: int, rngs: nnx.Rngs, *, param_dtype):
    c = lambda i, o, k, s=1, p=0: BasicConv2d(i, o, rngs, kernel=k, stride=s, padding=p, param_dtype=param_dtype)
    self.branch3x3_1, self.branch3x3_2 = c(c_in, 192, 1), c(192, 320, 3, 2)
    self.branch7x7x3_1, self.branch7x7x3_2 = c(c_in, 192, 1), c(192, 192, (1, 7), 1, (0, 3))
    self.branch7x7x3_3, self.branch7x7x3_4 = c(192, 192, (7, 1), 1, (3, 0)), c(192, 192, 3, 2)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return _cat(b3, b7, max_pool(x, 2))


class InceptionE(nnx.Module):
  """Mixed_7b / 7c (8x8): 1x1 | 1x1-[1x3, 3x1] | 1x1-3x3-[1x3, 3x1] | pool-1x1. The pool is the no-pad average
  in Mixed_7b and a 3x3 max pool in Mixed_7c (``max_pool=True``), as the TF graph has it."""

  def __init__(self, c_in: int, rngs: nnx.Rngs, *, max_pool: bool, param_dtype):
    c = lambda i, o, k, p=0: BasicConv2d(i, o, rngs, kernel=k, padding=p, param_dtype=param_dtype)
    row, col = ((1, 3), (0, 1)), ((3, 1), (1, 0))
    self.max_pool = max_pool
    self.branch1x1 = c(c_in, 320, 1)
    self.branch3x3_1, self.branch3x3_2a, self.branch3x3_2b = c(c_in, 384, 1), c(384, 384, *row), c(384, 384, *col)
    self.branch3x3dbl_1, self.branch3x3dbl_2 = c(c_in, 448, 1), c(448, 384, 3, 1)
    self.branch3x3dbl_3a, self.branch3x3dbl_3b = c(384, 384, *row), c(384, 384, *col)
    self.branch_pool = c(c_in, 192, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_1(x)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = max_pool(x, 1, 1) if self.max_pool else avg_pool_no_pad(x)
    return _cat(self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3), self.branch3x3dbl_3a(d),
                self.branch3x3dbl_3b(d), self.branch_pool(pooled))


class Linear(nnx.Module):
  """The 2048 -> num_classes classifier: ``kernel`` (2048, num_classes) and ``bias`` (kept so a converted file
  exports back unchanged; the logits ADM uses leave it out)."""

  def __init__(self, d_in: int, d_out: int, rngs: nnx.Rngs, *, param_dtype):
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (d_in, d_out), param_dtype),
                            **logical(None, None))
    self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype), **logical(None))


# ---------------------------------------------------------------------------------------------------------------
# Model


class InceptionV3(nnx.Module):
  """The FID Inception-v3. ``model(images)`` -> {'pool3': (B, 2048), 'spatial': (B, 2023), 'logits': (B, 1008)}
  for images (B, H, W, 3) in [0, 255]; :meth:`features` takes the already preprocessed (B, 299, 299, 3) input."""

  def __init__(self, config: InceptionConfig = InceptionConfig(), *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.config = config
    self.dtype = dtype  # the network always computes in float32; kept for dit_jax.load's signature
    kw = dict(param_dtype=param_dtype)
    c = lambda i, o, k, s=1, p=0: BasicConv2d(i, o, rngs, kernel=k, stride=s, padding=p, **kw)
    self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3 = c(3, 32, 3, 2), c(32, 32, 3), c(32, 64, 3, 1, 1)
    self.Conv2d_3b_1x1, self.Conv2d_4a_3x3 = c(64, 80, 1), c(80, 192, 3)
    self.Mixed_5b = InceptionA(192, 32, rngs, **kw)
    self.Mixed_5c = InceptionA(256, 64, rngs, **kw)
    self.Mixed_5d = InceptionA(288, 64, rngs, **kw)
    self.Mixed_6a = InceptionB(288, rngs, **kw)
    self.Mixed_6b = InceptionC(768, 128, rngs, **kw)
    self.Mixed_6c = InceptionC(768, 160, rngs, **kw)
    self.Mixed_6d = InceptionC(768, 160, rngs, **kw)
    self.Mixed_6e = InceptionC(768, 192, rngs, **kw)
    self.Mixed_7a = InceptionD(768, rngs, **kw)
    self.Mixed_7b = InceptionE(1280, rngs, max_pool=False, **kw)
    self.Mixed_7c = InceptionE(2048, rngs, max_pool=True, **kw)
    self.fc = Linear(2048, config.num_classes, rngs, **kw)

  def features(self, x: jax.Array) -> dict[str, jax.Array]:
    """Preprocessed input (B, S, S, 3) ((x - 128) / 128 at S = 299) -> {'pool3', 'spatial', 'logits'}, float32."""
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x.astype(jnp.float32))))  # (B, 147, 147, 64)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(max_pool(x, 2)))  # (B, 71, 71, 192)
    x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(max_pool(x, 2))))  # (B, 35, 35, 288)
    x = self.Mixed_6a(x)  # (B, 17, 17, 768)
    x, _ = self.Mixed_6b(x)
    x, _ = self.Mixed_6c(x)
    x, mixed_6_conv = self.Mixed_6d(x)  # (B, 17, 17, 192)
    x, _ = self.Mixed_6e(x)
    x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 8, 8, 2048)
    pool3 = x.mean(axis=(1, 2))  # (B, 2048)
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)  # (B, 17 * 17 * 7), (H, W, C) order
    logits = jnp.dot(pool3, self.fc.kernel[...].astype(jnp.float32), precision=HIGHEST)  # (B, 1008), no bias
    return {"pool3": pool3, "spatial": spatial, "logits": logits}

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """Images (B, H, W, 3) in [0, 255] (uint8 or float, any H, W) -> {'pool3', 'spatial', 'logits'}."""
    return self.features(preprocess(images, self.config.image_size))
