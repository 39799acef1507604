"""Forward parity through the real converter path, against upstream diffusers with random weights (fp32,
matmul precision 'highest'). Tolerance 1e-5 relative max-abs error; the measured error is in the message."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dit_jax
from dit_jax.convert.files import convert
from tests.helpers import rel_err
from tests.helpers.reference import (as_original_convention_, diffusers_dit, dit_forward, dit_inputs,
                                     original_state_dict)

TOL = 1e-5

CONFIGS = {
    "p2-sigma": dict(patch=2, learn_sigma=True),
    "p4-nosigma": dict(patch=4, learn_sigma=False),
    "p8-sigma": dict(patch=8, learn_sigma=True, sample_size=32),
    "odd-sizes": dict(heads=3, head_dim=24, depth=3, sample_size=12, patch=2, in_channels=3, num_classes=7,
                      norm_eps=1e-5),
    "wide-eps6": dict(heads=2, head_dim=64, sample_size=8, patch=2, norm_eps=1e-6),
}


def _ours(ckpt, x, t, y):
  model = dit_jax.load(ckpt)
  return np.asarray(model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)))


@pytest.mark.parametrize("name", CONFIGS)
def test_diffusers_folder_matches_diffusers(tmp, name):
  ref_model = diffusers_dit(**CONFIGS[name])
  ref_model.save_pretrained(tmp / "dit")
  convert(tmp / "dit", tmp / "ckpt")
  cfg = ref_model.config
  x, t, y = dit_inputs(4, cfg.sample_size, cfg.in_channels, cfg.num_embeds_ada_norm)
  err = rel_err(_ours(tmp / "ckpt", x, t, y), dit_forward(ref_model, x, t, y))
  assert err <= TOL, f"{name}: relative max-abs error {err:.2e} > {TOL:.0e}"
  print(f"{name}: diffusers parity rel err {err:.2e}")


def test_dit_pipeline_folder_and_bare_files(tmp):
  """A full DiTPipeline folder (transformer/ + vae/ + scheduler/), a bare diffusers .safetensors and a .bin."""
  from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

  ref_model = diffusers_dit(depth=2)
  vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, layers_per_block=1)
  DiTPipeline(transformer=ref_model, vae=vae, scheduler=DDIMScheduler()).save_pretrained(tmp / "pipe")
  ref_model.save_pretrained(tmp / "bin", safe_serialization=False)
  x, t, y = dit_inputs(3, 16, 4, 10)
  ref = dit_forward(ref_model, x, t, y)
  sources = {"pipeline": (tmp / "pipe", {}),
             "bin": (tmp / "bin", {}),
             "bare": (tmp / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors",
                      dict(input_size=16, num_heads=4))}
  for name, (src, kw) in sources.items():
    convert(src, tmp / f"ckpt-{name}", **kw)
    err = rel_err(_ours(tmp / f"ckpt-{name}", x, t, y), ref)
    assert err <= TOL, f"{name}: relative max-abs error {err:.2e}"


@pytest.mark.parametrize("name,kw", [
    ("S/2-shaped", dict(heads=6, head_dim=64, depth=2, patch=2, sample_size=8, num_classes=1000)),
    ("B/4-shaped", dict(heads=12, head_dim=64, depth=2, patch=4, sample_size=8, num_classes=1000)),
    ("XL/2-shaped", dict(heads=16, head_dim=72, depth=2, patch=2, sample_size=8, num_classes=1000)),
])
def test_original_state_dict_matches_reference(tmp, name, kw):
  """Original-format .pt (facebookresearch/DiT keys, fused qkv, stored pos_embed) against diffusers' DiT switched
  to the original's two numeric conventions (timestep shift 0, eps 1e-6): the original DiT's computation."""
  ref_model = diffusers_dit(**kw)
  as_original_convention_(ref_model)
  torch.save(original_state_dict(ref_model), tmp / "dit.pt")
  cfg = convert(tmp / "dit.pt", tmp / "ckpt")
  assert (cfg.freq_shift, cfg.mlp_norm_eps, cfg.num_heads) == (0.0, 1e-6, kw["heads"])
  x, t, y = dit_inputs(4, 8, 4, 1000)
  err = rel_err(_ours(tmp / "ckpt", x, t, y), dit_forward(ref_model, x, t, y))
  assert err <= TOL, f"{name}: relative max-abs error {err:.2e}"


def test_conventions_are_not_interchangeable(tmp):
  """The diffusers and original conventions give measurably different outputs, so each parity test can fail."""
  ref_model = diffusers_dit()
  ref_model.save_pretrained(tmp / "dit")
  convert(tmp / "dit", tmp / "ckpt")
  x, t, y = dit_inputs(4, 16, 4, 10)
  diffusers_out = dit_forward(ref_model, x, t, y)
  as_original_convention_(ref_model)
  assert rel_err(_ours(tmp / "ckpt", x, t, y), dit_forward(ref_model, x, t, y)) > 100 * TOL
  assert rel_err(_ours(tmp / "ckpt", x, t, y), diffusers_out) <= TOL
