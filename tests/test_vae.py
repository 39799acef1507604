"""AutoencoderKL: parity with diffusers (random weights saved in the real formats), strict conversion, bf16 smoke."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dit_jax.convert import vae_tables
from dit_jax.convert.readers import ConversionError, read_source
from dit_jax.models.vae import PRESETS, AutoencoderKL, DiagonalGaussian, VAEConfig
from tests.helpers import rel_err
from tests.helpers.reference import ldm_state_dict, randomize_

SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
VARIANTS = {
    "sd": dict(latent_channels=4, scaling_factor=0.18215),
    "sd3": dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
                shift_factor=0.0609),
}
SIZES = [(32, 32), (32, 48)]


def diffusers_vae(variant: str, seed: int = 0):
  from diffusers import AutoencoderKL as TorchAutoencoderKL

  n = len(SMALL["block_out_channels"])
  torch.manual_seed(seed)
  model = TorchAutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                             **SMALL, **VARIANTS[variant])
  randomize_(model, seed)
  return model.eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
  """(diffusers model, converted dit_jax model, source tensors) for one variant, through save_pretrained."""
  ref = diffusers_vae(request.param)
  folder = tmp_path_factory.mktemp(request.param) / "vae"
  ref.save_pretrained(folder)
  source = read_source(folder)
  layout = vae_tables.detect_layout(source.tensors)
  assert layout == "diffusers"
  cfg = vae_tables.infer_config(source.tensors, layout, source.diffusers_config)
  assert cfg == VAEConfig(**SMALL, **VARIANTS[request.param])
  return ref, vae_tables.to_model(source.tensors, cfg, layout), source.tensors


def _images(h: int, w: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (2, h, w, 3)).astype(np.float32)


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(x: torch.Tensor) -> np.ndarray:
  return x.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_encode_decode_match_diffusers(pair, size):
  ref, vae, _ = pair
  x = _images(*size)
  with torch.no_grad():
    posterior = ref.encode(_nchw(x)).latent_dist
    z = np.random.default_rng(1).standard_normal(posterior.mean.shape).astype(np.float32)
    decoded = ref.decode(torch.from_numpy(z)).sample
  ours = nnx.jit(lambda m, images: m.encode(images))(vae, jnp.asarray(x))
  for name in ("mean", "logvar", "std"):  # measured <= 1.1e-6
    err = rel_err(getattr(ours, name), _nhwc(getattr(posterior, name)))
    assert err < 1e-5, f"posterior {name}: rel err {err:.2e}"
  out = nnx.jit(lambda m, latents: m.decode(latents))(vae, jnp.asarray(z.transpose(0, 2, 3, 1)))
  assert out.shape == (2, *size, 3)
  err = rel_err(out, _nhwc(decoded))
  assert err < 1e-5, f"decoded: rel err {err:.2e}"


def test_latent_scaling_and_posterior(pair):
  _, vae, _ = pair
  cfg = vae.config
  z = jnp.linspace(-3, 3, 24).reshape(1, 2, 3, 4)
  np.testing.assert_allclose(vae.scale_latents(z), (z - cfg.shift_factor) * cfg.scaling_factor, rtol=1e-6)
  np.testing.assert_allclose(vae.unscale_latents(vae.scale_latents(z)), z, rtol=1e-5, atol=1e-6)
  post = DiagonalGaussian.from_moments(jnp.concatenate([z, jnp.full_like(z, 50.0)], axis=-1))
  assert float(post.logvar.max()) == 20.0
  a, b = post.sample(jax.random.key(0)), post.sample(jax.random.key(0))
  assert a.shape == z.shape and np.array_equal(a, b) and not np.array_equal(a, post.mean)


def test_ldm_layout_matches_diffusers_mapping(pair):
  """An LDM single-file state dict (built by reversing diffusers' own mapping, checked with diffusers'
  convert_ldm_vae_checkpoint) converts to the same parameters as the diffusers folder."""
  from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

  ref, vae, tensors = pair
  ldm = ldm_state_dict(tensors, len(SMALL["block_out_channels"]))
  back = convert_ldm_vae_checkpoint({k: torch.from_numpy(v) for k, v in ldm.items()}, ref.config)
  assert sorted(back) == sorted(tensors)
  assert all(np.array_equal(back[k].numpy(), tensors[k]) for k in tensors)
  full = {f"first_stage_model.{k}": v for k, v in ldm.items()} | {"model.diffusion_model.x.weight": np.zeros(1)}
  sub = vae_tables.select_vae_tensors(full)
  assert vae_tables.detect_layout(sub) == "ldm"
  cfg = vae_tables.infer_config(sub, "ldm", scaling_factor=vae.config.scaling_factor,
                                shift_factor=vae.config.shift_factor, norm_num_groups=SMALL["norm_num_groups"])
  assert cfg == vae.config
  ours = vae_tables.from_model(vae_tables.to_model(sub, cfg, "ldm"), "diffusers")
  assert sorted(ours) == sorted(tensors) and all(np.array_equal(ours[k], tensors[k]) for k in tensors)
  assert all(np.array_equal(a, sub[k]) for k, a in vae_tables.from_model(vae, "ldm").items())


def test_strict_conversion(pair):
  _, vae, tensors = pair
  cfg = vae.config
  some = next(iter(sorted(tensors)))
  for bad, word in (({k: v for k, v in tensors.items() if k != some}, "missing keys"),
                    ({**tensors, "encoder.extra.weight": np.zeros(1, np.float32)}, "unexpected keys"),
                    ({**tensors, "encoder.conv_in.weight": np.zeros((1, 1, 3, 3), np.float32)}, "wrong shape")):
    with pytest.raises(ConversionError) as info:
      vae_tables.to_model(bad, cfg, "diffusers")
    assert word in str(info.value) and "\n" not in str(info.value)
  if cfg.latent_channels == 16:  # SD3 and FLUX differ only in their scales: never guessed
    with pytest.raises(ConversionError, match="preset"):
      vae_tables.infer_config(tensors, "diffusers")
  assert len(vae_tables.LAYOUTS["diffusers"](cfg)) == len(tensors)


def test_bf16_smoke(pair):
  _, _, tensors = pair
  cfg = vae_tables.infer_config(tensors, "diffusers", norm_num_groups=SMALL["norm_num_groups"],
                         scaling_factor=1.0)
  vae = vae_tables.to_model(tensors, cfg, "diffusers", dtype=jnp.bfloat16)
  x = jnp.asarray(_images(32, 48))
  ref = vae_tables.to_model(tensors, cfg, "diffusers")

  @jax.jit
  def roundtrip(images):
    return vae.decode(vae.encode(images).mean)

  out = roundtrip(x)
  assert out.dtype == jnp.bfloat16 and out.shape == x.shape and bool(jnp.isfinite(out).all())
  assert rel_err(out.astype(jnp.float32), ref.decode(ref.encode(x).mean)) < 5e-2


def test_presets_and_config_round_trip():
  assert PRESETS["sd3"].latent_channels == 16 and not PRESETS["sd3"].use_quant_conv
  assert (PRESETS["flux"].scaling_factor, PRESETS["flux"].shift_factor) == (0.3611, 0.1159)
  assert PRESETS["sdxl"].scaling_factor == 0.13025 and PRESETS["sd-vae-ft-mse"].scaling_factor == 0.18215
  for cfg in PRESETS.values():
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match="norm_num_groups"):
    VAEConfig(block_out_channels=(30, 64), norm_num_groups=8)
  with pytest.raises(ValueError, match="H, W multiples of 2"):
    nnx.eval_shape(lambda: AutoencoderKL(VAEConfig(**SMALL), rngs=nnx.Rngs(0))).encode(jnp.zeros((1, 33, 32, 3)))
