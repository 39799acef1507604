"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie, 2023), in Flax NNX, channels-last.

Module names follow facebookresearch/DiT ``models.py`` so the checkpoint key table reads one-to-one.
The two numeric conventions on which diffusers' ``DiTTransformer2DModel`` departs from the original are
config fields (``freq_shift``, ``mlp_norm_eps``); :data:`CONVENTIONS` holds both sets.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dit_jax.models import layers
from dit_jax.models.config import JsonConfig, check_all
from dit_jax.models.layers import FrozenParam, check_build_options, layer_norm, modulate, unpatchify

# Numeric conventions of the two checkpoint formats.
#   freq_shift:   timestep frequencies exp(-ln(1e4) i / (128 - shift)); diffusers' Timesteps uses shift 1.
#   attn_norm_eps: eps of the LayerNorm before attention (and of the final layer's): 1e-6 in both.
#   mlp_norm_eps: eps of the LayerNorm before the MLP: diffusers uses its `norm_eps` (1e-5 by default).
CONVENTIONS = {
    "original": dict(freq_shift=0.0, attn_norm_eps=1e-6, mlp_norm_eps=1e-6),
    "diffusers": dict(freq_shift=1.0, attn_norm_eps=1e-6, mlp_norm_eps=1e-5),
}


@dataclasses.dataclass(frozen=True)
class DiTConfig(JsonConfig):
  """Hyper-parameters and numeric conventions of a DiT. ``input_size`` is the latent side (32 for 256 px)."""

  input_size: int = 32
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  class_dropout_prob: float = 0.1
  num_classes: int = 1000
  learn_sigma: bool = True
  freq_shift: float = 0.0
  attn_norm_eps: float = 1e-6
  mlp_norm_eps: float = 1e-6
  guidance_embed: bool = False  # a guidance input g (guidance distillation; FLUX.1 [dev]'s design)
  interval_embed: bool = False  # a second time input, the interval t - r (MeanFlow's average velocity)

  def __post_init__(self):
    checks = [
        (self.input_size > 0 and self.patch_size > 0, "input_size and patch_size must be positive"),
        (self.input_size % self.patch_size == 0,
         f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}"),
        (self.depth > 0 and self.in_channels > 0 and self.num_classes > 0,
         "depth, in_channels and num_classes must be positive"),
        (self.num_heads > 0 and self.hidden_size % self.num_heads == 0,
         f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"),
        (self.hidden_size % 4 == 0, f"hidden_size {self.hidden_size} must be divisible by 4 (2-D sin-cos table)"),
        (0.0 <= self.class_dropout_prob < 1.0, f"class_dropout_prob {self.class_dropout_prob} is not in [0, 1)"),
        (self.mlp_ratio > 0, f"mlp_ratio {self.mlp_ratio} must be positive"),
    ]
    check_all(checks, "invalid DiT config")

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @property
  def grid_size(self) -> int:
    return self.input_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid_size**2

  @property
  def null_class(self) -> int:
    return self.num_classes


# (depth, hidden_size, num_heads) of the paper's four model sizes.
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
CONFIGS = {f"DiT-{s}/{p}": dict(depth=d, hidden_size=h, num_heads=n, patch_size=p)
           for s, (d, h, n) in SIZES.items() for p in (2, 4, 8)}


def dit_config(name: str, convention: str = "original", **overrides) -> DiTConfig:
  """A named config ('DiT-XL/2', also 'DiT-XL-2') with a numeric convention ('original' | 'diffusers')."""
  key = name if name in CONFIGS else "/".join(name.rsplit("-", 1))
  if key not in CONFIGS:
    raise ValueError(f"unknown DiT model {name!r}; choose one of {', '.join(CONFIGS)}")
  if convention not in CONVENTIONS:
    raise ValueError(f"unknown convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
  return DiTConfig(**{**CONFIGS[key], **CONVENTIONS[convention], **overrides})


class DiTBlock(nnx.Module):
  """Transformer block with adaLN-Zero conditioning: (B, T, D), c (B, D) -> (B, T, D)."""

  def __init__(self, cfg: DiTConfig, rngs: nnx.Rngs, *, dtype, param_dtype, attention_impl: str):
    d = cfg.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.attn_norm_eps = cfg.attn_norm_eps
    self.mlp_norm_eps = cfg.mlp_norm_eps
    self.attn = layers.Attention(d, cfg.num_heads, rngs, implementation=attention_impl, **kw)
    self.mlp = layers.Mlp(d, int(d * cfg.mlp_ratio), rngs, **kw)
    self.adaLN_modulation = layers.linear(d, 6 * d, rngs, kernel_init=layers.zeros, axes=("embed", "mod"), **kw)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
        self.adaLN_modulation(nnx.silu(c)), 6, axis=-1)
    x = x + gate_msa[:, None] * self.attn(modulate(layer_norm(x, self.attn_norm_eps), shift_msa, scale_msa))
    x = x + gate_mlp[:, None] * self.mlp(modulate(layer_norm(x, self.mlp_norm_eps), shift_mlp, scale_mlp))
    return x


class FinalLayer(nnx.Module):
  """adaLN (shift, scale) + linear to patch pixels: (B, T, D), c (B, D) -> (B, T, p*p*out_channels)."""

  def __init__(self, cfg: DiTConfig, rngs: nnx.Rngs, *, dtype, param_dtype):
    d = cfg.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=layers.zeros)
    self.eps = cfg.attn_norm_eps
    self.adaLN_modulation = layers.linear(d, 2 * d, rngs, axes=("embed", "mod"), **kw)
    self.linear = layers.linear(d, cfg.patch_size**2 * cfg.out_channels, rngs, axes=("embed", None), **kw)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    shift, scale = jnp.split(self.adaLN_modulation(nnx.silu(c)), 2, axis=-1)
    return self.linear(modulate(layer_norm(x, self.eps), shift, scale))


class DiT(nnx.Module):
  """Class-conditional Diffusion Transformer.

  Call: ``model(x, t, y)`` with x (B, H, W, C) latents, t (B,) timesteps 0..999, y (B,) class ids where
  ``config.num_classes`` is the null (unconditional) class. Returns (B, H, W, out_channels); with
  ``learn_sigma`` the channels are [eps (C), variance interpolation (C)].

  ``scan_layers`` (fixed at construction) stores the blocks stacked, ``blocks[0]`` a :class:`layers.Stacked` of
  ``depth`` (leading axis 'layers'), run by one ``lax.scan``; :func:`stack_blocks` / :func:`unstack_blocks` map
  states between that and the canonical per-block layout. ``remat`` may be changed after construction.
  """

  def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               attention_impl: str = "auto", remat: str = "none", scan_layers: bool = False):
    check_build_options(attention_impl, remat)
    cfg = self.config = config
    self.remat = remat
    self.scan_layers = scan_layers
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.dtype = dtype
    self.x_embedder = layers.PatchEmbed(cfg.patch_size, cfg.in_channels, cfg.hidden_size, rngs, **kw)
    self.t_embedder = layers.TimestepEmbedder(cfg.hidden_size, rngs, freq_shift=cfg.freq_shift, **kw)
    self.y_embedder = layers.LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout_prob, rngs,
                                           param_dtype=param_dtype)
    self.guidance_embedder, self.interval_embedder = layers.scalar_embedders(
        cfg.hidden_size, rngs, guidance=cfg.guidance_embed, interval=cfg.interval_embed, freq_shift=cfg.freq_shift,
        **kw)
    table = layers.sincos_2d(cfg.hidden_size, cfg.grid_size, cfg.grid_size)
    self.pos_embed = FrozenParam(jnp.asarray(table, dtype=param_dtype), **layers.logical(None, "embed"))
    blocks = [DiTBlock(cfg, rngs, attention_impl=attention_impl, **kw) for _ in range(cfg.depth)]
    self.blocks = layers.stack_runs(blocks, block_runs(cfg)) if scan_layers else nnx.List(blocks)
    self.final_layer = FinalLayer(cfg, rngs, **kw)

  def condition(self, t: jax.Array, y: jax.Array, dropout_key: jax.Array | None = None,
                force_drop_ids: jax.Array | None = None, guidance: jax.Array | None = None,
                interval: jax.Array | None = None) -> jax.Array:
    """c = t_embedder(t) + y_embedder(y) [+ guidance_embedder(1000 g)] [+ interval_embedder(interval)]: (B, D)."""
    c = self.t_embedder(t) + self.y_embedder(y, dropout_key, force_drop_ids).astype(self.dtype)
    return layers.add_scalar_inputs(c, {"guidance": self.guidance_embedder, "interval": self.interval_embedder},
                                    {"guidance": guidance, "interval": interval})

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, *, dropout_key: jax.Array | None = None,
               force_drop_ids: jax.Array | None = None, guidance: jax.Array | None = None,
               interval: jax.Array | None = None) -> jax.Array:
    """Predict eps (and the learned variance) for noisy latents.

    Args:
      x: (B, H, W, C) with H = W = config.input_size.
      t: (B,) float or int timesteps.
      y: (B,) int class ids; ``config.num_classes`` = null class.
      dropout_key: PRNG key enabling training-time label dropout (``class_dropout_prob``).
      force_drop_ids: (B,) ints; where 1 the label is replaced by the null class.
      guidance: (B,) or scalar guidance scale g, embedded as 1000 g (``guidance_embed`` models only).
      interval: (B,) second time, the interval t - r in model-time units (``interval_embed`` models only).
    Returns:
      (B, H, W, out_channels) in the compute dtype.
    """
    cfg = self.config
    tokens = self.embed(x)
    cond = self.condition(t, y, dropout_key, force_drop_ids, guidance, interval)
    tokens = self.run_blocks(tokens, cond)
    tokens = self.final_layer(tokens, cond)
    return unpatchify(tokens, cfg.patch_size, cfg.out_channels, cfg.grid_size, cfg.grid_size)

  def embed(self, x: jax.Array) -> jax.Array:
    """Patch tokens plus the sin-cos table: (B, H, W, C) -> (B, T, D) in the compute dtype."""
    cfg = self.config
    _, h, w, c = x.shape
    if (h, w, c) != (cfg.input_size, cfg.input_size, cfg.in_channels):
      raise ValueError(f"DiT expects input (B, {cfg.input_size}, {cfg.input_size}, {cfg.in_channels}) NHWC, "
                       f"got {tuple(x.shape)}")
    return self.x_embedder(x.astype(self.dtype)) + self.pos_embed[...].astype(self.dtype)

  def run_blocks(self, tokens: jax.Array, cond: jax.Array) -> jax.Array:
    """All blocks, each optionally rematerialised (``remat``); stacked blocks (``scan_layers``) by one ``lax.scan``
    over the stored stack: (B, T, D) -> (B, T, D)."""
    return layers.run_blocks(self.blocks, lambda block, x: block(x, cond), tokens, remat=self.remat)

  def features(self, x: jax.Array, t: jax.Array, y: jax.Array, block_ids: Sequence[int], *,
               guidance: jax.Array | None = None, interval: jax.Array | None = None) -> list[jax.Array]:
    """The token outputs (B, T, D) of the blocks ``block_ids`` (in that order; LADD's discriminator reads them),
    conditioned without dropout; runs the blocks up to the last one asked for. Per-block layout only."""
    if self.scan_layers:
      raise ValueError("features needs the per-block layout (a model built with scan_layers=False)")
    depth = self.config.depth
    if not len(block_ids) or not all(0 <= int(i) < depth for i in block_ids):
      raise ValueError(f"feature blocks {list(block_ids)} must be block indices in 0..{depth - 1}")
    tokens = self.embed(x)                                                   # (B, T, D)
    cond = self.condition(t, y, guidance=guidance, interval=interval)        # (B, D)
    out = {}
    for i in range(max(block_ids) + 1):
      tokens = layers.apply_block(self.blocks[i], lambda block, x: block(x, cond), tokens, self.remat)
      out[i] = tokens
    return [out[i] for i in block_ids]


def block_runs(cfg: DiTConfig) -> tuple[int, ...]:
  """Lengths of the runs of same-structure blocks a ``scan_layers`` DiT stores stacked: all blocks."""
  return (cfg.depth,)


def stack_blocks(state: nnx.State, cfg: DiTConfig) -> nnx.State:
  """A per-block DiT state (``blocks.i``) -> the ``scan_layers`` layout (``blocks.0.layer``, leading axis depth)."""
  return layers.stack_blocks(state, "blocks", block_runs(cfg))


def unstack_blocks(state: nnx.State, cfg: DiTConfig) -> nnx.State:
  """Inverse of :func:`stack_blocks`: the canonical per-block layout."""
  return layers.unstack_blocks(state, "blocks", block_runs(cfg))


def flops_per_image(cfg: DiTConfig) -> float:
  """Forward FLOPs per image: 2 x the DiT paper's multiply-accumulate count (XL/2 at 256 px: 2 x 118.6 G)."""
  t, d, p = cfg.num_tokens, cfg.hidden_size, cfg.patch_size
  hidden = int(cfg.mlp_ratio * d)
  block = 4 * t * d * d + 2 * t * d * hidden + 2 * t * t * d + 6 * d * d
  macs = cfg.depth * block + t * cfg.in_channels * p * p * d + 256 * d + d * d + 2 * d * d
  return 2.0 * (macs + t * d * p * p * cfg.out_channels)


def count_params(model: nnx.Module, include_frozen: bool = True) -> int:
  """Number of scalars in trainable parameters (plus frozen tables such as pos_embed)."""
  kinds = (nnx.Param, FrozenParam) if include_frozen else nnx.Param
  state = nnx.state(model, kinds)
  return sum(int(v.size) for v in jax.tree.leaves(state))
