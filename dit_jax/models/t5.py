"""T5 v1.1 encoder (SD3's ``text_encoder_3``, FLUX's T5-XXL) in Flax NNX.

Numerics follow transformers' ``T5EncoderModel``:

    h = shared[ids]                                                      # (B, L, D), no scaling
    bias = relative_attention_bias[bucket(k - q)]                       # (H, L, L), block 0's table, every layer
    h = h + o(softmax(q k^T + bias + mask) v)    with q, k, v of rms(h) # NO 1/sqrt(d_kv)
    h = h + wo(gelu_tanh(wi_0 rms(h)) * wi_1 rms(h))                    # wo float32 (``_keep_in_fp32_modules``)
    out = rms(h)                                                         # final_layer_norm

rms(x) = x / sqrt(mean(x^2) + eps) * weight, statistics in float32. The residual stream stays float32 whatever the
compute dtype (transformers' bf16 / fp16 model promotes it to float32 through the float32 ``wo`` output), so a bf16
model does not overflow on the large activations of the released XXL weights. The bucket matrix is integer and
computed on the host (:func:`relative_position_buckets`).

Module names: ``shared``, ``blocks[i].{attn_norm, attn.{q,k,v,o}, ff_norm, ff.{wi_0,wi_1,wo}}``,
``relative_attention_bias`` (block 0's table, held once) and ``final_layer_norm``; the transformers layout maps onto
them in :mod:`dit_jax.convert.t5_tables`.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.models import layers
from dit_jax.models.config import JsonConfig, check_all
from dit_jax.models.layers import RMSNorm

FEED_FORWARD = ("gated-gelu",)  # T5 v1.1: gelu_new (tanh) on wi_0 times wi_1


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig(JsonConfig):
  """Hyper-parameters of a T5 v1.1 encoder, named as transformers' ``T5Config`` (defaults: T5-XXL)."""

  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"

  def __post_init__(self):
    check_all([
        (min(self.vocab_size, self.d_model, self.d_kv, self.d_ff, self.num_layers, self.num_heads) > 0,
         "all sizes must be positive"),
        (self.relative_attention_num_buckets >= 4 and self.relative_attention_num_buckets % 2 == 0,
         f"relative_attention_num_buckets {self.relative_attention_num_buckets} must be even and >= 4"),
        (self.relative_attention_max_distance > self.relative_attention_num_buckets // 4,
         f"relative_attention_max_distance {self.relative_attention_max_distance} must exceed "
         f"relative_attention_num_buckets / 4"),
        (self.layer_norm_epsilon > 0, f"layer_norm_epsilon {self.layer_norm_epsilon} must be > 0"),
        (self.feed_forward_proj in FEED_FORWARD,
         f"feed_forward_proj {self.feed_forward_proj!r} is not one of {FEED_FORWARD} (T5 v1.1)"),
    ], "invalid T5 encoder config")

  @property
  def inner_dim(self) -> int:
    """num_heads * d_kv: the width of q, k, v."""
    return self.num_heads * self.d_kv


T5_XXL = T5EncoderConfig()  # google/t5-v1_1-xxl encoder: 4.76 B parameters
PRESETS = {"t5-v1_1-xxl": T5_XXL}


def relative_position_buckets(length: int, num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
  """Bidirectional T5 bucket of each (query i, key j) offset j - i: (length, length) int32.

  Half the buckets per direction (keys after the query in the upper half); within a half, offsets below
  num_buckets/4 get their own bucket, larger ones share log-spaced buckets up to max_distance, the last bucket
  holding everything beyond. The log is taken in float32 in transformers' operation order, so the integer table is
  transformers' own, including offsets where the real-valued bucket is an exact integer (16, 32, 64 for XXL).
  """
  half = num_buckets // 2
  max_exact = half // 2
  offset = np.arange(length)[None, :] - np.arange(length)[:, None]
  n = np.abs(offset)
  scaled = (np.log(np.maximum(n, 1).astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
  large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
  return (np.where(offset > 0, half, 0) + np.where(n < max_exact, n, large)).astype(np.int32)


class SelfAttention(nnx.Module):
  """Multi-head attention without biases or score scaling: (B, L, D) -> (B, L, D)."""

  def __init__(self, cfg: T5EncoderConfig, rngs: nnx.Rngs, *, dtype, param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype, use_bias=False, kernel_init=layers.normal_002)
    self.num_heads, self.d_kv, self.dtype = cfg.num_heads, cfg.d_kv, dtype
    self.q = layers.linear(cfg.d_model, cfg.inner_dim, rngs, axes=("embed", "heads"), **kw)
    self.k = layers.linear(cfg.d_model, cfg.inner_dim, rngs, axes=("embed", "heads"), **kw)
    self.v = layers.linear(cfg.d_model, cfg.inner_dim, rngs, axes=("embed", "heads"), **kw)
    self.o = layers.linear(cfg.inner_dim, cfg.d_model, rngs, axes=("heads", "embed"), **kw)

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    """x (B, L, D), bias (B or 1, H, L, L) float32 (position bias plus mask)."""
    b, n, _ = x.shape
    heads = lambda a: a.reshape(b, n, self.num_heads, self.d_kv)
    q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias  # (B, H, L, L)
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return self.o(out.reshape(b, n, self.num_heads * self.d_kv))


class GatedFeedForward(nnx.Module):
  """wo(gelu_tanh(wi_0 x) * wi_1 x): (B, L, D) -> (B, L, D) float32. ``wo`` is stored and computed in float32
  whatever ``param_dtype`` / ``dtype`` (transformers' ``_keep_in_fp32_modules``), and the gated product is formed in
  float32: both can exceed fp16's range, and the ``wo`` output dominates the residual stream of the XXL weights."""

  def __init__(self, cfg: T5EncoderConfig, rngs: nnx.Rngs, *, dtype, param_dtype):
    kw = dict(use_bias=False, kernel_init=layers.normal_002)
    self.wi_0 = layers.linear(cfg.d_model, cfg.d_ff, rngs, axes=("embed", "mlp"), dtype=dtype,
                              param_dtype=param_dtype, **kw)
    self.wi_1 = layers.linear(cfg.d_model, cfg.d_ff, rngs, axes=("embed", "mlp"), dtype=dtype,
                              param_dtype=param_dtype, **kw)
    self.wo = layers.linear(cfg.d_ff, cfg.d_model, rngs, axes=("mlp", "embed"), dtype=jnp.float32,
                            param_dtype=jnp.float32, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate, linear = self.wi_0(x).astype(jnp.float32), self.wi_1(x).astype(jnp.float32)  # product kept off fp16 range
    return self.wo(jax.nn.gelu(gate, approximate=True) * linear)


class T5Block(nnx.Module):
  """Pre-norm self-attention and gated feed-forward, each added to the float32 residual stream."""

  def __init__(self, cfg: T5EncoderConfig, rngs: nnx.Rngs, *, dtype, param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.dtype = dtype
    self.attn_norm = RMSNorm(cfg.d_model, param_dtype=param_dtype, eps=cfg.layer_norm_epsilon)
    self.attn = SelfAttention(cfg, rngs, **kw)
    self.ff_norm = RMSNorm(cfg.d_model, param_dtype=param_dtype, eps=cfg.layer_norm_epsilon)
    self.ff = GatedFeedForward(cfg, rngs, **kw)

  def __call__(self, h: jax.Array, bias: jax.Array) -> jax.Array:
    """h (B, L, D) float32 -> (B, L, D) float32."""
    h = h + self.attn(self.attn_norm(h).astype(self.dtype), bias).astype(jnp.float32)
    return h + self.ff(self.ff_norm(h).astype(self.dtype)).astype(jnp.float32)


class T5Encoder(nnx.Module):
  """T5 v1.1 encoder stack.

  Call: ``model(ids, attention_mask=None)`` with ids (B, L) int token ids and an optional attention_mask (B, L)
  (1 = attend, 0 = padding key; diffusers' SD3 and FLUX pipelines pass none, so pads are attended). Returns the
  final-layer-normed hidden states (B, L, d_model) in the compute dtype.
  """

  def __init__(self, config: T5EncoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    cfg = self.config = config
    self.dtype = dtype
    self.shared = nnx.Embed(cfg.vocab_size, cfg.d_model, param_dtype=param_dtype, rngs=rngs,
                            embedding_init=nnx.initializers.normal(1.0),
                            embedding_metadata=layers.logical("vocab", "embed"))
    self.relative_attention_bias = nnx.Param(
        layers.normal_002(rngs.params(), (cfg.relative_attention_num_buckets, cfg.num_heads), param_dtype),
        **layers.logical(None, "heads"))
    self.blocks = nnx.List([T5Block(cfg, rngs, dtype=dtype, param_dtype=param_dtype)
                            for _ in range(cfg.num_layers)])
    self.final_layer_norm = RMSNorm(cfg.d_model, param_dtype=param_dtype, eps=cfg.layer_norm_epsilon)

  def position_bias(self, length: int) -> jax.Array:
    """(1, H, L, L) float32 relative-position bias shared by every layer."""
    cfg = self.config
    buckets = relative_position_buckets(length, cfg.relative_attention_num_buckets,
                                        cfg.relative_attention_max_distance)
    table = self.relative_attention_bias[...].astype(jnp.float32)
    return jnp.transpose(table[jnp.asarray(buckets)], (2, 0, 1))[None]

  def __call__(self, ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"T5Encoder expects (B, L) integer token ids, got {ids.dtype} {tuple(ids.shape)}")
    bias = self.position_bias(ids.shape[1])  # (1, H, L, L)
    if attention_mask is not None:
      if attention_mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, ids {tuple(ids.shape)}")
      # transformers adds finfo.min to the scores of padded keys
      bias = bias + jnp.where(attention_mask.astype(bool), 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
    h = self.shared(ids).astype(jnp.float32)  # (B, L, D) float32 residual stream
    for block in self.blocks:
      h = block(h, bias)
    return self.final_layer_norm(h).astype(self.dtype)


def num_params(cfg: T5EncoderConfig) -> int:
  """Parameter count of the encoder (embedding included)."""
  d, inner = cfg.d_model, cfg.inner_dim
  block = 4 * d * inner + 3 * d * cfg.d_ff + 2 * d
  return cfg.vocab_size * d + cfg.relative_attention_num_buckets * cfg.num_heads + cfg.num_layers * block + d
