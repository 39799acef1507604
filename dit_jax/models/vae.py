"""AutoencoderKL: the LDM / Stable Diffusion / SD3 / FLUX image VAE (f=8), in Flax NNX, channels-last.

A port of diffusers' ``AutoencoderKL`` (``Encoder``, ``Decoder``, ``ResnetBlock2D``, ``Downsample2D``,
``Upsample2D`` and the mid-block single-head ``Attention``). Module names follow diffusers so the key table
(:mod:`dit_jax.convert.vae_tables`) reads one-to-one; ``downsamplers.0`` / ``upsamplers.0`` / ``attentions.0`` /
``to_out.0`` become ``downsample`` / ``upsample`` / ``attention`` / ``to_out``.

Images are (B, H, W, C) in [-1, 1]; latents are (B, H/f, W/f, latent_channels) with f = 2**(levels - 1).
``encode`` and ``decode`` work in raw latent units; diffusion models see ``scale_latents(z)``.
GroupNorm statistics are computed in float32 whatever the compute dtype.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from dit_jax.models.attention import IMPLEMENTATIONS, dot_product_attention
from dit_jax.models.config import JsonConfig, check_all

RESNET_EPS = 1e-6  # every GroupNorm of the VAE (resnets, attention, norm_out)
LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class VAEConfig(JsonConfig):
  """Hyper-parameters of an AutoencoderKL (defaults: the SD 1.x kl-f8 VAE).

  ``scaling_factor`` / ``shift_factor`` map raw latents z to the diffusion model's units:
  ``(z - shift_factor) * scaling_factor``.
  """

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    g = self.norm_num_groups
    checks = [
        (len(self.block_out_channels) > 0, "block_out_channels is empty"),
        (self.in_channels > 0 and self.out_channels > 0 and self.latent_channels > 0,
         "in_channels, out_channels and latent_channels must be positive"),
        (self.layers_per_block > 0, f"layers_per_block {self.layers_per_block} must be positive"),
        (g > 0 and all(c > 0 and c % g == 0 for c in self.block_out_channels),
         f"block_out_channels {self.block_out_channels} are not all positive multiples of norm_num_groups {g}"),
        (self.scaling_factor > 0, f"scaling_factor {self.scaling_factor} must be positive"),
    ]
    check_all(checks, "invalid VAE config")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


PRESETS: dict[str, VAEConfig] = {
    "sd-vae-ft-ema": VAEConfig(),
    "sd-vae-ft-mse": VAEConfig(),
    "sdxl": VAEConfig(scaling_factor=0.13025),
    "sd3": VAEConfig(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                     use_post_quant_conv=False),
    "flux": VAEConfig(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                      use_post_quant_conv=False),
}


def vae_config(name: str, **overrides) -> VAEConfig:
  """A named preset ('sd-vae-ft-ema', 'sd-vae-ft-mse', 'sdxl', 'sd3', 'flux') with optional overrides."""
  if name not in PRESETS:
    raise ValueError(f"unknown VAE preset {name!r}; choose one of {', '.join(PRESETS)}")
  return dataclasses.replace(PRESETS[name], **overrides)


# ---------------------------------------------------------------------------------------------------------------
# Layers


def conv(c_in: int, c_out: int, rngs: nnx.Rngs, *, kernel: int = 3, stride: int = 1, padding=1, dtype,
         param_dtype) -> nnx.Conv:
  """nnx.Conv (HWIO kernel) with torch's symmetric integer padding, or an explicit nnx padding spec."""
  pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
  return nnx.Conv(c_in, c_out, kernel_size=(kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm over the channel axis of (B, ..., C): biased variance, statistics and affine in float32,
  result in the input dtype."""

  def __init__(self, num_groups: int, channels: int, *, eps: float = RESNET_EPS, param_dtype=jnp.float32):
    if channels % num_groups:
      raise ValueError(f"{channels} channels are not divisible into {num_groups} groups")
    self.num_groups = num_groups
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((channels,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    shape = x.shape
    g = self.num_groups
    x32 = x.astype(jnp.float32).reshape(shape[0], -1, g, shape[-1] // g)
    mean = x32.mean(axis=(1, 3), keepdims=True)
    centred = x32 - mean
    var = jnp.mean(jnp.square(centred), axis=(1, 3), keepdims=True)
    y = (centred * jax.lax.rsqrt(var + self.eps)).reshape(shape)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


class ResnetBlock2D(nnx.Module):
  """norm1 -> SiLU -> conv3x3 -> norm2 -> SiLU -> conv3x3, plus the input (1x1 ``conv_shortcut`` when the channel
  count changes). No time embedding, dropout 0, output_scale_factor 1 (the VAE's configuration)."""

  def __init__(self, c_in: int, c_out: int, groups: int, rngs: nnx.Rngs, *, dtype, param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm1 = GroupNorm(groups, c_in, param_dtype=param_dtype)
    self.conv1 = conv(c_in, c_out, rngs, **kw)
    self.norm2 = GroupNorm(groups, c_out, param_dtype=param_dtype)
    self.conv2 = conv(c_out, c_out, rngs, **kw)
    self.conv_shortcut = conv(c_in, c_out, rngs, kernel=1, padding=0, **kw) if c_in != c_out else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
    return shortcut + h


class Downsample(nnx.Module):
  """Pad bottom/right by one (torch ``F.pad(x, (0, 1, 0, 1))``), then a stride-2 3x3 conv without padding."""

  def __init__(self, channels: int, rngs: nnx.Rngs, *, dtype, param_dtype):
    self.conv = conv(channels, channels, rngs, stride=2, padding=((0, 1), (0, 1)), dtype=dtype,
                     param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest-neighbour x2 (exactly torch's ``interpolate(scale_factor=2, mode='nearest')``), then a 3x3 conv."""

  def __init__(self, channels: int, rngs: nnx.Rngs, *, dtype, param_dtype):
    self.conv = conv(channels, channels, rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class AttentionBlock(nnx.Module):
  """Single-head spatial self-attention over all H*W positions, head dim = channels, with a pre-GroupNorm and a
  residual: x + to_out(softmax(q k^T / sqrt(C)) v) (diffusers ``Attention`` as the VAE mid-block builds it)."""

  def __init__(self, channels: int, groups: int, rngs: nnx.Rngs, *, dtype, param_dtype, implementation: str):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.implementation = implementation
    self.group_norm = GroupNorm(groups, channels, param_dtype=param_dtype)
    self.to_q = nnx.Linear(channels, channels, **kw)
    self.to_k = nnx.Linear(channels, channels, **kw)
    self.to_v = nnx.Linear(channels, channels, **kw)
    self.to_out = nnx.Linear(channels, channels, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    tokens = self.group_norm(x).reshape(b, h * w, 1, c)
    out = dot_product_attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens),
                                implementation=self.implementation)
    return x + self.to_out(out.reshape(b, h, w, c))


class MidBlock(nnx.Module):
  """resnet -> attention (optional) -> resnet at the lowest resolution."""

  def __init__(self, channels: int, groups: int, add_attention: bool, rngs: nnx.Rngs, *, dtype, param_dtype,
               implementation: str):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups, rngs, **kw) for _ in range(2)])
    self.attention = (AttentionBlock(channels, groups, rngs, implementation=implementation, **kw)
                      if add_attention else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    if self.attention is not None:
      x = self.attention(x)
    return self.resnets[1](x)


class ResnetStage(nnx.Module):
  """One resolution level: ``num_layers`` resnets then an optional down- or upsampler (diffusers'
  DownEncoderBlock2D / UpDecoderBlock2D)."""

  def __init__(self, c_in: int, c_out: int, num_layers: int, groups: int, resample: str | None, rngs: nnx.Rngs, *,
               dtype, param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.resnets = nnx.List([ResnetBlock2D(c_in if j == 0 else c_out, c_out, groups, rngs, **kw)
                             for j in range(num_layers)])
    self.downsample = Downsample(c_out, rngs, **kw) if resample == "down" else None
    self.upsample = Upsample(c_out, rngs, **kw) if resample == "up" else None

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    if self.downsample is not None:
      x = self.downsample(x)
    if self.upsample is not None:
      x = self.upsample(x)
    return x


class Encoder(nnx.Module):
  """(B, H, W, in_channels) -> (B, H/f, W/f, 2 * latent_channels) moments [mean | logvar]."""

  def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs, *, dtype, param_dtype, implementation: str):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
    self.conv_in = conv(cfg.in_channels, ch[0], rngs, **kw)
    self.down_blocks = nnx.List([
        ResnetStage(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, "down" if i < n - 1 else None, rngs, **kw)
        for i in range(n)])
    self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention, rngs, implementation=implementation, **kw)
    self.conv_norm_out = GroupNorm(g, ch[-1], param_dtype=param_dtype)
    self.conv_out = conv(ch[-1], 2 * cfg.latent_channels, rngs, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """(B, h, w, latent_channels) -> (B, h*f, w*f, out_channels)."""

  def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs, *, dtype, param_dtype, implementation: str):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
    self.conv_in = conv(cfg.latent_channels, ch[0], rngs, **kw)
    self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention, rngs, implementation=implementation, **kw)
    self.up_blocks = nnx.List([
        ResnetStage(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, "up" if i < n - 1 else None, rngs, **kw)
        for i in range(n)])
    self.conv_norm_out = GroupNorm(g, ch[-1], param_dtype=param_dtype)
    self.conv_out = conv(ch[-1], cfg.out_channels, rngs, **kw)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


# ---------------------------------------------------------------------------------------------------------------
# Posterior and model


@struct.dataclass
class DiagonalGaussian:
  """The encoder's posterior N(mean, exp(logvar)) in raw latent units, (B, h, w, latent_channels) float32.
  A pytree, so it can be returned from jitted functions."""

  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
    """Split (..., 2C) moments into mean and logvar (clamped to [-30, 20], as diffusers and LDM)."""
    moments = moments.astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean, jnp.clip(logvar, *LOGVAR_RANGE))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  def mode(self) -> jax.Array:
    return self.mean

  def sample(self, key: jax.Array) -> jax.Array:
    """mean + std * eps with eps ~ N(0, I) drawn from ``key``."""
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def kl(self) -> jax.Array:
    """KL(q || N(0, I)) summed over all latent elements: (B,)."""
    return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


class AutoencoderKL(nnx.Module):
  """The KL-regularised image autoencoder of latent diffusion.

  ``encode(images)`` -> :class:`DiagonalGaussian` over raw latents; ``decode(latents)`` -> images.
  ``scale_latents`` / ``unscale_latents`` convert between raw latents and the diffusion model's units.
  """

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               attention_impl: str = "auto"):
    if attention_impl not in IMPLEMENTATIONS:
      raise ValueError(f"attention_impl {attention_impl!r} is not one of {IMPLEMENTATIONS}")
    cfg = self.config = config
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    z2, z = 2 * cfg.latent_channels, cfg.latent_channels
    self.encoder = Encoder(cfg, rngs, implementation=attention_impl, **kw)
    self.decoder = Decoder(cfg, rngs, implementation=attention_impl, **kw)
    self.quant_conv = conv(z2, z2, rngs, kernel=1, padding=0, **kw) if cfg.use_quant_conv else None
    self.post_quant_conv = conv(z, z, rngs, kernel=1, padding=0, **kw) if cfg.use_post_quant_conv else None

  def encode(self, images: jax.Array) -> DiagonalGaussian:
    """Images (B, H, W, in_channels) in [-1, 1], H and W multiples of ``config.downsample_factor`` -> posterior
    over raw latents (B, H/f, W/f, latent_channels), float32."""
    cfg = self.config
    f = cfg.downsample_factor
    if images.ndim != 4 or images.shape[-1] != cfg.in_channels or images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f"VAE.encode expects (B, H, W, {cfg.in_channels}) NHWC with H, W multiples of {f}, "
                       f"got {tuple(images.shape)}")
    moments = self.encoder(images.astype(self.dtype))
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    return DiagonalGaussian.from_moments(moments)

  def decode(self, latents: jax.Array) -> jax.Array:
    """Raw latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels) in the compute dtype."""
    cfg = self.config
    if latents.ndim != 4 or latents.shape[-1] != cfg.latent_channels:
      raise ValueError(f"VAE.decode expects (B, h, w, {cfg.latent_channels}) NHWC latents, "
                       f"got {tuple(latents.shape)}")
    z = latents.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Reconstruction: decode(posterior sample), or decode(mean) without a key."""
    posterior = self.encode(images)
    return self.decode(posterior.mean if key is None else posterior.sample(key))

  def scale_latents(self, z: jax.Array) -> jax.Array:
    """Raw latents -> diffusion units: (z - shift_factor) * scaling_factor."""
    return (z - self.config.shift_factor) * self.config.scaling_factor

  def unscale_latents(self, z: jax.Array) -> jax.Array:
    """Diffusion units -> raw latents: z / scaling_factor + shift_factor."""
    return z / self.config.scaling_factor + self.config.shift_factor
