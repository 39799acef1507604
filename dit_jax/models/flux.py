"""FLUX.1 [dev] / [schnell] transformer (Black Forest Labs) in Flax NNX, channels-last.

Module names follow BFL's ``flux/model.py`` (``img_in``, ``txt_in``, ``time_in`` / ``guidance_in`` / ``vector_in``,
``double_blocks.N.{img,txt}_{mod,attn,mlp}`` with fused qkv, ``single_blocks.N.linear1`` fused qkv + MLP-in,
``final_layer``) so the original single file reads one-to-one; diffusers' ``FluxTransformer2DModel`` layout is mapped
onto it by :mod:`dit_jax.convert.flux_tables`. The final layer's adaLN projection is stored in BFL's (shift, scale)
order; diffusers' ``norm_out.linear`` stores (scale, shift) and the key table swaps it.

Forward (``vec`` the conditioning vector, LN affine-free with eps 1e-6, every residual gated):

    vec = time_in(emb(1000 t)) [+ guidance_in(emb(1000 g))] + vector_in(pooled)
    img, txt = img_in(pack(x)), txt_in(context)
    19 x double block: separate img / txt weights, one attention over [txt, img]
    38 x single block over [txt, img]: x + gate * linear2([attn(q, k, v), gelu(mlp)]) with linear1 -> (q, k, v, mlp)
    out = unpack(final_layer(img, vec))

Queries and keys get a per-head RMSNorm with a learned scale, then 3-axis rotary embeddings over (index, row,
column) ids with interleaved pairs. The cos / sin table is computed on the host in float64 from the ids (text first)
and rounded once to float32, as diffusers does; BFL's current HEAD computes it in float32, about 1.5e-5 rad off.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.models import layers
from dit_jax.models.attention import dot_product_attention
from dit_jax.models.config import JsonConfig, check_all
from dit_jax.models.layers import RMSNorm, check_build_options, layer_norm, modulate
from dit_jax.models.mmdit import VectorEmbedder

NORM_EPS = 1e-6  # every LayerNorm (affine-free) and the QK RMSNorm
TIME_FACTOR = 1000.0  # t in [0, 1] and the guidance scale are multiplied by this before the sinusoidal features


@dataclasses.dataclass(frozen=True)
class FluxConfig(JsonConfig):
  """Hyper-parameters of a FLUX.1 transformer, named as diffusers' ``FluxTransformer2DModel`` config.

  ``in_channels`` / ``out_channels`` count packed (2x2) channels: a latent of C channels gives 4C (64 for the
  16-channel FLUX VAE; Fill 384, Canny / Depth 128 carry their conditioning latents in extra channels).
  ``axes_dims_rope`` splits the head width between the (index, row, column) rotary axes.
  """

  in_channels: int = 64
  out_channels: int = 64
  num_layers: int = 19
  num_single_layers: int = 38
  attention_head_dim: int = 128
  num_attention_heads: int = 24
  joint_attention_dim: int = 4096
  pooled_projection_dim: int = 768
  guidance_embeds: bool = False
  axes_dims_rope: tuple[int, ...] = (16, 56, 56)
  theta: int = 10_000
  mlp_ratio: float = 4.0

  def __post_init__(self):
    object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
    sizes = (self.in_channels, self.out_channels, self.num_layers, self.num_single_layers, self.attention_head_dim,
             self.num_attention_heads, self.joint_attention_dim, self.pooled_projection_dim, self.theta)
    checks = [
        (all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes), "all sizes must be positive"),
        (isinstance(self.guidance_embeds, bool), f"guidance_embeds {self.guidance_embeds!r} must be a bool"),
        (self.in_channels % 4 == 0 and self.out_channels % 4 == 0,
         f"in_channels {self.in_channels} and out_channels {self.out_channels} must be multiples of 4 (2x2 packing)"),
        (sum(self.axes_dims_rope) == self.attention_head_dim and all(a > 0 and a % 2 == 0 for a in self.axes_dims_rope),
         f"axes_dims_rope {list(self.axes_dims_rope)} must be positive even widths summing to attention_head_dim "
         f"{self.attention_head_dim}"),
        (self.mlp_ratio > 0 and float(self.hidden_size * self.mlp_ratio).is_integer(),
         f"mlp_ratio {self.mlp_ratio} must give an integer MLP width for hidden size {self.hidden_size}"),
    ]
    check_all(checks, "invalid FLUX config")

  @property
  def hidden_size(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def mlp_hidden(self) -> int:
    return int(self.hidden_size * self.mlp_ratio)


# ---------------------------------------------------------------------------------------------------------------
# Positions: ids, rotary table, 2x2 packing


def image_ids(grid_h: int, grid_w: int) -> np.ndarray:
  """(grid_h * grid_w, 3) float64 ids of the packed image tokens, row-major: (0, row, column)."""
  ids = np.zeros((grid_h, grid_w, 3))
  ids[..., 1] = np.arange(grid_h)[:, None]
  ids[..., 2] = np.arange(grid_w)[None, :]
  return ids.reshape(grid_h * grid_w, 3)


def rope_table(ids: np.ndarray, axes_dims: tuple[int, ...], theta: int) -> tuple[np.ndarray, np.ndarray]:
  """Rotary cos / sin for ids (..., T, n_axes) -> each (..., T, sum(axes_dims)) float32.

  Axis i uses frequencies theta^(-2j / d_i), j < d_i / 2; every angle is repeated for its (even, odd) pair.
  Computed in float64 on the host and rounded once.
  """
  ids = np.asarray(ids, np.float64)
  if ids.ndim not in (2, 3) or ids.shape[-1] != len(axes_dims):
    raise ValueError(f"position ids must be (T, {len(axes_dims)}) or (B, T, {len(axes_dims)}), got {ids.shape}")
  angles = []
  for i, d in enumerate(axes_dims):
    omega = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    angles.append(ids[..., i:i + 1] * omega)
  angle = np.repeat(np.concatenate(angles, axis=-1), 2, axis=-1)
  return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate adjacent pairs (x0, x1) -> (cos x0 - sin x1, sin x0 + cos x1) in float32: x (B, T, H, D), cos / sin
  (B or 1, T, D) -> (B, T, H, D) in x's dtype."""
  x32 = x.astype(jnp.float32)
  pairs = x32.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def pack(x: jax.Array) -> jax.Array:
  """(B, H, W, C) latents -> (B, H/2 * W/2, 4C) tokens, features ordered (C, row in patch, col in patch) as BFL's
  ``b c (h ph) (w pw) -> b (h w) (c ph pw)``."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack(x: jax.Array, height: int, width: int) -> jax.Array:
  """Inverse of :func:`pack`: (B, H/2 * W/2, 4C) -> (B, H, W, C)."""
  b, _, f = x.shape
  c = f // 4
  x = x.reshape(b, height // 2, width // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, height, width, c)


# ---------------------------------------------------------------------------------------------------------------
# Blocks


class QKNorm(nnx.Module):
  """Per-head RMSNorm of queries and keys with learned scales (BFL ``norm.query_norm`` / ``norm.key_norm``)."""

  def __init__(self, head_dim: int, *, param_dtype):
    self.query_norm = RMSNorm(head_dim, param_dtype=param_dtype, eps=NORM_EPS)
    self.key_norm = RMSNorm(head_dim, param_dtype=param_dtype, eps=NORM_EPS)

  def __call__(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.query_norm(q), self.key_norm(k)


def split_heads(qkv: jax.Array, heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(B, T, 3D) rows [q | k | v], each head-major -> q, k, v each (B, T, H, D/H)."""
  b, t, f = qkv.shape
  qkv = qkv.reshape(b, t, 3, heads, f // (3 * heads))
  return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


class SelfAttention(nnx.Module):
  """One stream's attention weights in a double block: fused qkv, QK norm, output projection."""

  def __init__(self, cfg: FluxConfig, rngs: nnx.Rngs, *, dtype, param_dtype):
    d, kw = cfg.hidden_size, dict(dtype=dtype, param_dtype=param_dtype)
    self.heads = cfg.num_attention_heads
    self.qkv = layers.linear(d, 3 * d, rngs, axes=("embed", "heads"), **kw)
    self.norm = QKNorm(cfg.attention_head_dim, param_dtype=param_dtype)
    self.proj = layers.linear(d, d, rngs, axes=("heads", "embed"), **kw)

  def qkv_heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(B, T, D) -> normed q, k and v, each (B, T, H, D/H)."""
    q, k, v = split_heads(self.qkv(x), self.heads)
    q, k = self.norm(q, k)
    return q, k, v


class Modulation(nnx.Module):
  """``lin(silu(vec))`` split into ``n`` (B, D) chunks: (shift, scale, gate) per sub-layer."""

  def __init__(self, d: int, n: int, rngs: nnx.Rngs, *, dtype, param_dtype):
    self.n = n
    self.lin = layers.linear(d, n * d, rngs, kernel_init=layers.zeros, axes=("embed", "mod"), dtype=dtype,
                             param_dtype=param_dtype)

  def __call__(self, vec: jax.Array) -> list[jax.Array]:
    return jnp.split(self.lin(nnx.silu(vec)), self.n, axis=-1)


def attention(q, k, v, cos, sin, implementation: str) -> jax.Array:
  """RoPE on q and k, then softmax attention: (B, T, H, D) each -> (B, T, H*D)."""
  b, t, h, hd = q.shape
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  return dot_product_attention(q, k, v, implementation=implementation).reshape(b, t, h * hd)


class DoubleStreamBlock(nnx.Module):
  """Image and text streams with separate weights and one attention over [txt, img]."""

  def __init__(self, cfg: FluxConfig, rngs: nnx.Rngs, *, dtype, param_dtype, attention_impl: str):
    d, kw = cfg.hidden_size, dict(dtype=dtype, param_dtype=param_dtype)
    self.attention_impl = attention_impl
    self.img_mod = Modulation(d, 6, rngs, **kw)
    self.img_attn = SelfAttention(cfg, rngs, **kw)
    self.img_mlp = layers.Mlp(d, cfg.mlp_hidden, rngs, **kw)
    self.txt_mod = Modulation(d, 6, rngs, **kw)
    self.txt_attn = SelfAttention(cfg, rngs, **kw)
    self.txt_mlp = layers.Mlp(d, cfg.mlp_hidden, rngs, **kw)

  def __call__(self, img: jax.Array, txt: jax.Array, vec: jax.Array, cos: jax.Array, sin: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """img (B, N, D), txt (B, L, D), vec (B, D), cos / sin (B or 1, L + N, head_dim) -> (img, txt)."""
    i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
    t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
    iq, ik, iv = self.img_attn.qkv_heads(modulate(layer_norm(img, NORM_EPS), i_shift1, i_scale1))
    tq, tk, tv = self.txt_attn.qkv_heads(modulate(layer_norm(txt, NORM_EPS), t_shift1, t_scale1))
    out = attention(jnp.concatenate([tq, iq], 1), jnp.concatenate([tk, ik], 1), jnp.concatenate([tv, iv], 1),
                    cos, sin, self.attention_impl)
    n_txt = txt.shape[1]
    txt_attn, img_attn = out[:, :n_txt], out[:, n_txt:]
    img = img + i_gate1[:, None] * self.img_attn.proj(img_attn)
    img = img + i_gate2[:, None] * self.img_mlp(modulate(layer_norm(img, NORM_EPS), i_shift2, i_scale2))
    txt = txt + t_gate1[:, None] * self.txt_attn.proj(txt_attn)
    txt = txt + t_gate2[:, None] * self.txt_mlp(modulate(layer_norm(txt, NORM_EPS), t_shift2, t_scale2))
    return img, txt


class SingleStreamBlock(nnx.Module):
  """One stream over [txt, img]: linear1 -> (q, k, v, mlp) in parallel, linear2 over [attention, gelu(mlp)]."""

  def __init__(self, cfg: FluxConfig, rngs: nnx.Rngs, *, dtype, param_dtype, attention_impl: str):
    d, kw = cfg.hidden_size, dict(dtype=dtype, param_dtype=param_dtype)
    self.attention_impl = attention_impl
    self.heads = cfg.num_attention_heads
    self.modulation = Modulation(d, 3, rngs, **kw)
    self.linear1 = layers.linear(d, 3 * d + cfg.mlp_hidden, rngs, axes=("embed", "heads"), **kw)
    self.norm = QKNorm(cfg.attention_head_dim, param_dtype=param_dtype)
    self.linear2 = layers.linear(d + cfg.mlp_hidden, d, rngs, axes=("heads", "embed"), **kw)

  def __call__(self, x: jax.Array, vec: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B, L + N, D), vec (B, D) -> (B, L + N, D)."""
    shift, scale, gate = self.modulation(vec)
    d = x.shape[-1]
    h = self.linear1(modulate(layer_norm(x, NORM_EPS), shift, scale))
    q, k, v = split_heads(h[..., :3 * d], self.heads)
    q, k = self.norm(q, k)
    mlp = jax.nn.gelu(h[..., 3 * d:], approximate=True)
    out = self.linear2(jnp.concatenate([attention(q, k, v, cos, sin, self.attention_impl), mlp], axis=-1))
    return x + gate[:, None] * out


class LastLayer(nnx.Module):
  """adaLN (shift, scale) over an affine-free LayerNorm, then linear to packed channels."""

  def __init__(self, cfg: FluxConfig, rngs: nnx.Rngs, *, dtype, param_dtype):
    d = cfg.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=layers.zeros)
    self.adaLN_modulation = layers.linear(d, 2 * d, rngs, axes=("embed", "mod"), **kw)
    self.linear = layers.linear(d, cfg.out_channels, rngs, axes=("embed", None), **kw)

  def __call__(self, x: jax.Array, vec: jax.Array) -> jax.Array:
    shift, scale = jnp.split(self.adaLN_modulation(nnx.silu(vec)), 2, axis=-1)
    return self.linear(modulate(layer_norm(x, NORM_EPS), shift, scale))


# ---------------------------------------------------------------------------------------------------------------
# Model


def _host_ids(ids, name: str) -> np.ndarray:
  try:
    return np.asarray(ids, np.float64)
  except jax.errors.TracerArrayConversionError:
    raise ValueError(f"{name} must be a host (numpy) array: the rotary table is built on the host in float64, "
                     "outside jit") from None


class Flux(nnx.Module):
  """FLUX.1 transformer: rectified-flow velocity of packed latents given T5 tokens, a CLIP pooled vector, the time
  and (dev) the distilled guidance scale.

  Call: ``model(x, t, context, pooled, guidance=None, *, img_ids=None, txt_ids=None)`` with x (B, H, W,
  in_channels / 4) latents (H, W even; Fill / Canny / Depth: the noise latent concatenated with its conditioning
  latents along channels), t (B,) in [0, 1] (sigma; multiplied by 1000 inside as BFL and diffusers do), context
  (B, L, joint_attention_dim), pooled (B, pooled_projection_dim), guidance (B,) the guidance scale (needed when
  ``guidance_embeds``, ignored otherwise, as in BFL). ``img_ids`` (N, 3) / (B, N, 3) and ``txt_ids`` (L, 3) /
  (B, L, 3) are host (numpy) position ids; by default FluxPipeline's (0, row, column) grid and zeros. Returns
  (B, H, W, out_channels / 4).

  ``scan_layers`` (fixed at construction) stores the double and the single blocks each as one stack run by
  ``lax.scan``; ``remat`` may be changed after construction.
  """

  def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               attention_impl: str = "auto", remat: str = "none", scan_layers: bool = False):
    check_build_options(attention_impl, remat)
    cfg = self.config = config
    self.dtype, self.remat, self.scan_layers = dtype, remat, scan_layers
    d, kw = cfg.hidden_size, dict(dtype=dtype, param_dtype=param_dtype)
    self.img_in = layers.linear(cfg.in_channels, d, rngs, axes=(None, "embed"), **kw)
    self.time_in = layers.TimestepEmbedder(d, rngs, freq_shift=0.0, **kw)
    self.vector_in = VectorEmbedder(cfg.pooled_projection_dim, d, rngs, **kw)
    self.guidance_in = layers.TimestepEmbedder(d, rngs, freq_shift=0.0, **kw) if cfg.guidance_embeds else None
    self.txt_in = layers.linear(cfg.joint_attention_dim, d, rngs, axes=(None, "embed"), **kw)
    block_kw = dict(attention_impl=attention_impl, **kw)
    double = [DoubleStreamBlock(cfg, rngs, **block_kw) for _ in range(cfg.num_layers)]
    single = [SingleStreamBlock(cfg, rngs, **block_kw) for _ in range(cfg.num_single_layers)]
    self.double_blocks = layers.stack_runs(double, (cfg.num_layers,)) if scan_layers else nnx.List(double)
    self.single_blocks = layers.stack_runs(single, (cfg.num_single_layers,)) if scan_layers else nnx.List(single)
    self.final_layer = LastLayer(cfg, rngs, **kw)

  def condition(self, t: jax.Array, pooled: jax.Array, guidance: jax.Array | None = None) -> jax.Array:
    """vec = time_in(1000 t) [+ guidance_in(1000 g)] + vector_in(pooled): (B, D)."""
    vec = self.time_in(t.astype(jnp.float32) * TIME_FACTOR).astype(self.dtype)
    if self.guidance_in is not None:
      if guidance is None:
        raise ValueError("this FLUX model is guidance-distilled (guidance_embeds): pass guidance, the (B,) scale")
      g = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), t.shape)
      vec = vec + self.guidance_in(g * TIME_FACTOR).astype(self.dtype)
    return vec + self.vector_in(pooled.astype(self.dtype))

  def rope(self, grid_h: int, grid_w: int, n_txt: int, img_ids=None, txt_ids=None) -> tuple[jax.Array, jax.Array]:
    """cos / sin (B or 1, L + N, head_dim) for [txt, img] from host ids (defaults: zeros, the image grid)."""
    img_ids = image_ids(grid_h, grid_w) if img_ids is None else _host_ids(img_ids, "img_ids")
    txt_ids = np.zeros((n_txt, 3)) if txt_ids is None else _host_ids(txt_ids, "txt_ids")
    if img_ids.ndim not in (2, 3) or txt_ids.ndim not in (2, 3) or img_ids.shape[-2] != grid_h * grid_w \
        or txt_ids.shape[-2] != n_txt:
      raise ValueError(f"img_ids {img_ids.shape} / txt_ids {txt_ids.shape} do not match {grid_h * grid_w} image "
                       f"and {n_txt} text tokens")
    if img_ids.ndim == 3 or txt_ids.ndim == 3:  # per-example ids: broadcast the other to the batch
      batch = max(a.shape[0] for a in (img_ids, txt_ids) if a.ndim == 3)
      img_ids, txt_ids = (np.broadcast_to(a, (batch, *a.shape[-2:])) for a in (img_ids, txt_ids))
    ids = np.concatenate([txt_ids, img_ids], axis=-2)
    cos, sin = rope_table(ids, self.config.axes_dims_rope, self.config.theta)
    return jnp.asarray(cos.reshape(-1, *cos.shape[-2:])), jnp.asarray(sin.reshape(-1, *sin.shape[-2:]))

  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array, pooled: jax.Array,
               guidance: jax.Array | None = None, *, img_ids=None, txt_ids=None) -> jax.Array:
    cfg = self.config
    b, h, w, ch = x.shape
    if ch * 4 != cfg.in_channels or h % 2 or w % 2:
      raise ValueError(f"FLUX expects (B, H, W, {cfg.in_channels // 4}) NHWC latents with even H, W, got "
                       f"{tuple(x.shape)}")
    cos, sin = self.rope(h // 2, w // 2, context.shape[1], img_ids, txt_ids)
    vec = self.condition(t, pooled, guidance)
    img = self.img_in(pack(x.astype(self.dtype)))  # (B, N, D)
    txt = self.txt_in(context.astype(self.dtype))  # (B, L, D)
    img, txt = layers.run_blocks(self.double_blocks, lambda blk, c: blk(*c, vec, cos, sin), (img, txt),
                                 remat=self.remat)
    n_txt = txt.shape[1]
    joint = jnp.concatenate([txt, img], axis=1)  # (B, L + N, D)
    joint = layers.run_blocks(self.single_blocks, lambda blk, c: blk(c, vec, cos, sin), joint, remat=self.remat)
    out = self.final_layer(joint[:, n_txt:], vec)  # (B, N, out_channels)
    return unpack(out, h, w)


def stack_blocks(state: nnx.State, cfg: FluxConfig) -> nnx.State:
  """A per-block FLUX state -> the ``scan_layers`` layout (each block kind one stack)."""
  state = layers.stack_blocks(state, "double_blocks", (cfg.num_layers,))
  return layers.stack_blocks(state, "single_blocks", (cfg.num_single_layers,))


def unstack_blocks(state: nnx.State, cfg: FluxConfig) -> nnx.State:
  """Inverse of :func:`stack_blocks`: the canonical per-block layout."""
  state = layers.unstack_blocks(state, "double_blocks", (cfg.num_layers,))
  return layers.unstack_blocks(state, "single_blocks", (cfg.num_single_layers,))


def flops_per_sample(cfg: FluxConfig, height: int, width: int, context_len: int) -> float:
  """Forward FLOPs of one sample (2 x multiply-accumulates of every matmul and both attention products) for an
  (height, width) latent and ``context_len`` text tokens."""
  n, l, d, m = (height // 2) * (width // 2), context_len, cfg.hidden_size, cfg.mlp_hidden
  s = n + l
  macs = n * cfg.in_channels * d + l * cfg.joint_attention_dim * d  # img_in, txt_in
  macs += (2 if cfg.guidance_embeds else 1) * (256 * d + d * d) + cfg.pooled_projection_dim * d + d * d
  macs += cfg.num_layers * (s * (4 * d * d + 2 * d * m) + 12 * d * d + 2 * s * s * d)  # double blocks
  macs += cfg.num_single_layers * (s * (3 * d * d + d * m + (d + m) * d) + 3 * d * d + 2 * s * s * d)  # single
  macs += 2 * d * d + n * d * cfg.out_channels  # final layer
  return 2.0 * macs
