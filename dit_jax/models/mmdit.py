"""MMDiT (Stable Diffusion 3 / 3.5) and MMDiT-X (SD3.5 Medium) in Flax NNX, channels-last.

Module names follow Stability's ``mmditx.py`` (``x_embedder``, ``joint_blocks.N.x_block`` / ``context_block``,
fused ``attn.qkv``, ``final_layer``) so the original single-file layout reads one-to-one; the diffusers
``SD3Transformer2DModel`` layout is mapped onto it by :mod:`dit_jax.convert.mmdit_tables`. The numerics follow
diffusers: joint attention over the token sequence [image, context], LayerNorm / RMSNorm statistics in float32,
timestep features ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`` ([cos, sin]).

All adaLN projections are stored in Stability's chunk order: (shift, scale) for the final layer and the last
(pre-only) context block; diffusers' ``AdaLayerNormContinuous`` stores (scale, shift), which the key table swaps.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.models import layers
from dit_jax.models.attention import dot_product_attention
from dit_jax.models.config import JsonConfig, check_all
from dit_jax.models.layers import FrozenParam, RMSNorm, check_build_options, layer_norm, modulate, unpatchify

QK_NORMS = (None, "rms_norm")
NORM_EPS = 1e-6  # every LayerNorm (affine-free) and the QK RMSNorm


@dataclasses.dataclass(frozen=True)
class MMDiTConfig(JsonConfig):
  """Hyper-parameters of an SD3-family MMDiT, named as diffusers' ``SD3Transformer2DModel`` config.

  hidden size = num_attention_heads * attention_head_dim; ``caption_projection_dim`` must equal it.
  ``sample_size`` is the training latent side (only used for the initial sin-cos table); any latent up to
  ``pos_embed_max_size * patch_size`` per side runs, the stored table being centre-cropped.
  """

  sample_size: int = 128
  patch_size: int = 2
  in_channels: int = 16
  num_layers: int = 18
  attention_head_dim: int = 64
  num_attention_heads: int = 18
  joint_attention_dim: int = 4096
  caption_projection_dim: int = 1152
  pooled_projection_dim: int = 2048
  out_channels: int = 16
  pos_embed_max_size: int = 96
  qk_norm: str | None = None
  dual_attention_layers: tuple[int, ...] = ()
  guidance_embed: bool = False  # a guidance input g (guidance distillation; FLUX.1 [dev]'s design)
  interval_embed: bool = False  # a second time input, the interval t - r (MeanFlow's average velocity)

  def __post_init__(self):
    object.__setattr__(self, "dual_attention_layers", tuple(int(i) for i in self.dual_attention_layers))
    checks = [
        (min(self.sample_size, self.patch_size, self.in_channels, self.num_layers, self.attention_head_dim,
             self.num_attention_heads, self.joint_attention_dim, self.pooled_projection_dim, self.out_channels,
             self.pos_embed_max_size) > 0, "all sizes must be positive"),
        (self.caption_projection_dim == self.hidden_size,
         (f"caption_projection_dim {self.caption_projection_dim} must equal num_attention_heads * "
          f"attention_head_dim = {self.hidden_size}")),
        (self.hidden_size % 4 == 0, f"hidden size {self.hidden_size} must be divisible by 4 (2-D sin-cos table)"),
        (self.qk_norm in QK_NORMS, f"qk_norm {self.qk_norm!r} is not one of {QK_NORMS}"),
        (all(0 <= i < self.num_layers for i in self.dual_attention_layers),
         f"dual_attention_layers {self.dual_attention_layers} outside 0..{self.num_layers - 1}"),
    ]
    check_all(checks, "invalid MMDiT config")

  @property
  def hidden_size(self) -> int:
    return self.num_attention_heads * self.attention_head_dim


def pos_embed_table(dim: int, max_size: int, base_size: int) -> np.ndarray:
  """diffusers' SD3 initial table: a (max_size, max_size) sin-cos grid whose positions are arange(P) / (P / base),
  (P*P, dim) float32, first half of the channels = column. Released checkpoints store their own table."""
  pos = (np.arange(max_size, dtype=np.float32) / np.float32(max_size / base_size)).astype(np.float64)
  cols, rows = np.meshgrid(pos, pos)
  table = np.concatenate([layers.sincos_1d(dim // 2, cols), layers.sincos_1d(dim // 2, rows)], axis=1)
  return table.astype(np.float32)


def crop_pos_embed(table: jax.Array, max_size: int, grid_h: int, grid_w: int) -> jax.Array:
  """Centre crop of a (P*P, D) table to (grid_h*grid_w, D): rows from (P-h)//2, columns from (P-w)//2."""
  if grid_h > max_size or grid_w > max_size:
    raise ValueError(f"latent grid {grid_h}x{grid_w} exceeds pos_embed_max_size {max_size}")
  top, left = (max_size - grid_h) // 2, (max_size - grid_w) // 2
  grid = table.reshape(max_size, max_size, -1)[top:top + grid_h, left:left + grid_w]
  return grid.reshape(grid_h * grid_w, -1)


class StreamAttention(nnx.Module):
  """One stream's share of an attention: fused qkv (+ per-head QK RMSNorm) and, unless ``pre_only``, the output
  projection. qkv rows are [q | k | v], each head-major."""

  def __init__(self, hidden: int, heads: int, qk_norm: str | None, pre_only: bool, rngs: nnx.Rngs, *, dtype,
               param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.heads = heads
    self.qkv = layers.linear(hidden, 3 * hidden, rngs, axes=("embed", "heads"), **kw)
    head_dim = hidden // heads
    self.ln_q = RMSNorm(head_dim, param_dtype=param_dtype, eps=NORM_EPS) if qk_norm else None
    self.ln_k = RMSNorm(head_dim, param_dtype=param_dtype, eps=NORM_EPS) if qk_norm else None
    self.proj = None if pre_only else layers.linear(hidden, hidden, rngs, axes=("heads", "embed"), **kw)

  def qkv_heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(B, T, D) -> q, k, v each (B, T, H, D/H)."""
    b, t, d = x.shape
    qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.ln_q is not None:
      q, k = self.ln_q(q), self.ln_k(k)
    return q, k, v


class StreamBlock(nnx.Module):
  """One stream of a joint block (Stability's DismantledBlock): adaLN-Zero modulation, attention parts, MLP.

  Modulation chunks: (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp[, shift_msa2, scale_msa2,
  gate_msa2]); a ``pre_only`` block has (shift_msa, scale_msa) and no proj / MLP.
  """

  def __init__(self, cfg: MMDiTConfig, pre_only: bool, dual: bool, rngs: nnx.Rngs, *, dtype, param_dtype):
    d = cfg.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.pre_only = pre_only
    self.dual = dual
    self.n_mods = 2 if pre_only else 9 if dual else 6
    self.adaLN_modulation = layers.linear(d, self.n_mods * d, rngs, kernel_init=layers.zeros, axes=("embed", "mod"),
                                          **kw)
    args = (d, cfg.num_attention_heads, cfg.qk_norm)
    self.attn = StreamAttention(*args, pre_only, rngs, **kw)
    self.attn2 = StreamAttention(*args, False, rngs, **kw) if dual else None
    self.mlp = None if pre_only else layers.Mlp(d, 4 * d, rngs, **kw)

  def modulation(self, c: jax.Array) -> list[jax.Array]:
    return jnp.split(self.adaLN_modulation(nnx.silu(c)), self.n_mods, axis=-1)


class JointBlock(nnx.Module):
  """Image and context streams with separate weights, one attention over the concatenated tokens."""

  def __init__(self, cfg: MMDiTConfig, index: int, rngs: nnx.Rngs, *, dtype, param_dtype, attention_impl: str):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.attention_impl = attention_impl
    self.context_block = StreamBlock(cfg, index == cfg.num_layers - 1, False, rngs, **kw)
    self.x_block = StreamBlock(cfg, False, index in cfg.dual_attention_layers, rngs, **kw)

  def _attend(self, q, k, v):
    b, t, h, hd = q.shape
    return dot_product_attention(q, k, v, implementation=self.attention_impl).reshape(b, t, h * hd)

  def __call__(self, x: jax.Array, context: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (B, N, D) image tokens, context (B, L, D), c (B, D) -> (x, context); the context is returned unchanged
    by the last (pre-only) block, whose context output is never used."""
    xb, cb = self.x_block, self.context_block
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, *attn2_mods = xb.modulation(c)
    c_mods = cb.modulation(c)
    x_norm = layer_norm(x, NORM_EPS)
    xq, xk, xv = xb.attn.qkv_heads(modulate(x_norm, shift_msa, scale_msa))
    cq, ck, cv = cb.attn.qkv_heads(modulate(layer_norm(context, NORM_EPS), c_mods[0], c_mods[1]))
    n = x.shape[1]
    # diffusers' JointAttnProcessor2_0 order: [image, context]
    out = self._attend(jnp.concatenate([xq, cq], 1), jnp.concatenate([xk, ck], 1), jnp.concatenate([xv, cv], 1))
    x_attn, c_attn = out[:, :n], out[:, n:]

    x = x + gate_msa[:, None] * xb.attn.proj(x_attn)
    if xb.dual:
      shift_msa2, scale_msa2, gate_msa2 = attn2_mods
      q2, k2, v2 = xb.attn2.qkv_heads(modulate(x_norm, shift_msa2, scale_msa2))
      x = x + gate_msa2[:, None] * xb.attn2.proj(self._attend(q2, k2, v2))
    x = x + gate_mlp[:, None] * xb.mlp(modulate(layer_norm(x, NORM_EPS), shift_mlp, scale_mlp))

    if not cb.pre_only:
      _, _, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mods
      context = context + c_gate_msa[:, None] * cb.attn.proj(c_attn)
      context = context + c_gate_mlp[:, None] * cb.mlp(
          modulate(layer_norm(context, NORM_EPS), c_shift_mlp, c_scale_mlp))
    return x, context


class VectorEmbedder(nnx.Module):
  """(B, d_in) -> Linear -> SiLU -> Linear -> (B, D) (pooled text; Stability's ``y_embedder``)."""

  def __init__(self, d_in: int, hidden: int, rngs: nnx.Rngs, *, dtype, param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=layers.normal_002)
    self.fc1 = layers.linear(d_in, hidden, rngs, axes=(None, "embed"), **kw)
    self.fc2 = layers.linear(hidden, hidden, rngs, axes=("embed", None), **kw)

  def __call__(self, y: jax.Array) -> jax.Array:
    return self.fc2(nnx.silu(self.fc1(y)))


class FinalLayer(nnx.Module):
  """adaLN (shift, scale) over an affine-free LayerNorm, then linear to patch pixels (p, q, C)."""

  def __init__(self, cfg: MMDiTConfig, rngs: nnx.Rngs, *, dtype, param_dtype):
    d = cfg.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=layers.zeros)
    self.adaLN_modulation = layers.linear(d, 2 * d, rngs, axes=("embed", "mod"), **kw)
    self.linear = layers.linear(d, cfg.patch_size**2 * cfg.out_channels, rngs, axes=("embed", None), **kw)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    shift, scale = jnp.split(self.adaLN_modulation(nnx.silu(c)), 2, axis=-1)
    return self.linear(modulate(layer_norm(x, NORM_EPS), shift, scale))


class MMDiT(nnx.Module):
  """Text-conditional multimodal Diffusion Transformer (SD3 / SD3.5; MMDiT-X with ``dual_attention_layers``).

  Call: ``model(x, t, context, pooled)`` with x (B, H, W, C) latents (H, W multiples of the patch size, at most
  ``pos_embed_max_size * patch_size``), t (B,) timesteps in the model's units (sigma * 1000), context (B, L,
  joint_attention_dim) text tokens, pooled (B, pooled_projection_dim). Returns (B, H, W, out_channels)
  (the flow-matching velocity for SD3).

  ``scan_layers`` (fixed at construction) stores each run of consecutive same-structure blocks (the MMDiT-X
  dual-attention blocks, the plain blocks; the pre-only last block stands alone) stacked: ``joint_blocks[r]`` is
  a :class:`layers.Stacked` per run (or the block itself for a run of one), run by ``lax.scan``;
  :func:`stack_blocks` / :func:`unstack_blocks` map states between that and the canonical per-block layout.
  ``remat`` may be changed after construction.
  """

  def __init__(self, config: MMDiTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               attention_impl: str = "auto", remat: str = "none", scan_layers: bool = False):
    check_build_options(attention_impl, remat)
    cfg = self.config = config
    self.remat = remat
    self.scan_layers = scan_layers
    d = cfg.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.dtype = dtype
    self.x_embedder = layers.PatchEmbed(cfg.patch_size, cfg.in_channels, d, rngs, **kw)
    table = pos_embed_table(d, cfg.pos_embed_max_size, cfg.sample_size // cfg.patch_size)
    self.pos_embed = FrozenParam(jnp.asarray(table, dtype=param_dtype), **layers.logical(None, "embed"))
    self.t_embedder = layers.TimestepEmbedder(d, rngs, freq_shift=0.0, **kw)
    self.y_embedder = VectorEmbedder(cfg.pooled_projection_dim, d, rngs, **kw)
    self.guidance_embedder, self.interval_embedder = layers.scalar_embedders(
        d, rngs, guidance=cfg.guidance_embed, interval=cfg.interval_embed, freq_shift=0.0, **kw)
    self.context_embedder = layers.linear(cfg.joint_attention_dim, cfg.caption_projection_dim, rngs,
                                          axes=(None, "embed"), **kw)
    blocks = [JointBlock(cfg, i, rngs, attention_impl=attention_impl, **kw) for i in range(cfg.num_layers)]
    self.joint_blocks = layers.stack_runs(blocks, block_runs(cfg)) if scan_layers else nnx.List(blocks)
    self.final_layer = FinalLayer(cfg, rngs, **kw)

  def condition(self, t: jax.Array, pooled: jax.Array, guidance: jax.Array | None = None,
                interval: jax.Array | None = None) -> jax.Array:
    """c = t_embedder(t) + y_embedder(pooled) [+ guidance_embedder(1000 g)] [+ interval_embedder(interval)]:
    (B, D)."""
    c = self.t_embedder(t).astype(self.dtype) + self.y_embedder(pooled.astype(self.dtype))
    return layers.add_scalar_inputs(c, {"guidance": self.guidance_embedder, "interval": self.interval_embedder},
                                    {"guidance": guidance, "interval": interval})

  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array, pooled: jax.Array,
               skip_layers: tuple[int, ...] = (), *, guidance: jax.Array | None = None,
               interval: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    tokens, (gh, gw) = self.embed(x)
    c = self.condition(t, pooled, guidance, interval)
    ctx = self.context_embedder(context.astype(self.dtype))
    tokens, _ = self.run_blocks(tokens, ctx, c, skip_layers)
    tokens = self.final_layer(tokens, c)
    return unpatchify(tokens, cfg.patch_size, cfg.out_channels, gh, gw)

  def embed(self, x: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    """Patch tokens plus the centre-cropped sin-cos table: (B, H, W, C) -> ((B, N, D), token grid (H/p, W/p))."""
    cfg = self.config
    _, h, w, ch = x.shape
    p = cfg.patch_size
    if ch != cfg.in_channels or h % p or w % p:
      raise ValueError(f"MMDiT expects (B, H, W, {cfg.in_channels}) NHWC with H, W multiples of {p}, "
                       f"got {tuple(x.shape)}")
    gh, gw = h // p, w // p
    pos = crop_pos_embed(self.pos_embed[...], cfg.pos_embed_max_size, gh, gw)
    return self.x_embedder(x.astype(self.dtype)) + pos.astype(self.dtype)[None], (gh, gw)

  def features(self, x: jax.Array, t: jax.Array, context: jax.Array, pooled: jax.Array,
               block_ids: Sequence[int], *, guidance: jax.Array | None = None,
               interval: jax.Array | None = None) -> list[jax.Array]:
    """The image-token outputs (B, N, D) of the joint blocks ``block_ids`` (in that order; LADD's discriminator
    reads them); runs the blocks up to the last one asked for. Per-block layout only."""
    if self.scan_layers:
      raise ValueError("features needs the per-block layout (a model built with scan_layers=False)")
    n = self.config.num_layers
    if not len(block_ids) or not all(0 <= int(i) < n for i in block_ids):
      raise ValueError(f"feature blocks {list(block_ids)} must be block indices in 0..{n - 1}")
    tokens, _ = self.embed(x)                                                  # (B, N, D)
    c = self.condition(t, pooled, guidance, interval)                          # (B, D)
    carry = (tokens, self.context_embedder(context.astype(self.dtype)))        # + (B, L, D)
    out = {}
    for i in range(max(block_ids) + 1):
      carry = layers.apply_block(self.joint_blocks[i], lambda block, carry: block(*carry, c), carry, self.remat)
      out[i] = carry[0]
    return [out[i] for i in block_ids]

  def run_blocks(self, tokens: jax.Array, ctx: jax.Array, c: jax.Array, skip_layers: tuple[int, ...] = ()
                 ) -> tuple[jax.Array, jax.Array]:
    """The joint blocks not in ``skip_layers`` (block indices), each optionally rematerialised (``remat``); a
    stacked run (``scan_layers``) is one ``lax.scan`` over its stored stack, a skipped block in it passing its
    carry through. tokens (B, N, D), ctx (B, L, D), c (B, D) -> (tokens, ctx)."""
    return layers.run_blocks(self.joint_blocks, lambda block, carry: block(*carry, c), (tokens, ctx),
                             remat=self.remat, skip=skip_layers)


def block_runs(cfg: MMDiTConfig) -> tuple[int, ...]:
  """Lengths of the runs of same-structure joint blocks (dual-attention or not; the last block is pre-only) that
  a ``scan_layers`` MMDiT stores stacked."""
  n = cfg.num_layers
  return layers.run_lengths([(i in cfg.dual_attention_layers, i == n - 1) for i in range(n)])


def stack_blocks(state: nnx.State, cfg: MMDiTConfig) -> nnx.State:
  """A per-block MMDiT state (``joint_blocks.i``) -> the ``scan_layers`` layout (``joint_blocks.r[.layer]``)."""
  return layers.stack_blocks(state, "joint_blocks", block_runs(cfg))


def unstack_blocks(state: nnx.State, cfg: MMDiTConfig) -> nnx.State:
  """Inverse of :func:`stack_blocks`: the canonical per-block layout."""
  return layers.unstack_blocks(state, "joint_blocks", block_runs(cfg))


def flops_per_sample(cfg: MMDiTConfig, height: int, width: int, context_len: int) -> float:
  """Forward FLOPs of one sample (2 x multiply-accumulates of every matmul and both attention products) for an
  (height, width) latent and ``context_len`` text tokens."""
  n, l, d, p = (height // cfg.patch_size) * (width // cfg.patch_size), context_len, cfg.hidden_size, cfg.patch_size
  macs = n * p * p * cfg.in_channels * d + l * cfg.joint_attention_dim * d  # patch and context embedders
  macs += 256 * d + d * d + cfg.pooled_projection_dim * d + d * d  # timestep and pooled embedders
  for i in range(cfg.num_layers):
    pre_only, dual = i == cfg.num_layers - 1, i in cfg.dual_attention_layers
    macs += n * 12 * d * d + (9 if dual else 6) * d * d  # image stream: qkv, proj, 4x MLP, adaLN
    macs += l * (3 if pre_only else 12) * d * d + (2 if pre_only else 6) * d * d  # context stream
    macs += 2 * (n + l) ** 2 * d  # joint attention: QK^T and AV
    if dual:
      macs += n * 4 * d * d + 2 * n * n * d  # MMDiT-X second (image-only) attention
  macs += 2 * d * d + n * d * p * p * cfg.out_channels  # final layer
  return 2.0 * macs
