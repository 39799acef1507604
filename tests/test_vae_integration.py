"""The VAE through the converter and sample.py: a DiTPipeline folder converts with its VAE bundled, dit_jax's
pipeline (sampler + bundled VAE decode) reproduces diffusers' DiTPipeline images, sample.py writes RGB PNGs, and
an SD-style single file yields its VAE."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import dit_jax
from dit_jax import sample_files
from dit_jax.convert import ConversionError
from dit_jax.convert.files import convert, export
from dit_jax.diffusion.samplers import sample
from tests.helpers import rel_err
from tests.helpers.reference import diffusers_dit, randomize_

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tiny_vae():
  from diffusers import AutoencoderKL

  vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, latent_channels=4,
                      layers_per_block=1)  # 32 groups: an SD single file records no group count
  randomize_(vae, seed=3)
  return vae.eval()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  from diffusers import DDIMScheduler, DiTPipeline

  tmp = tmp_path_factory.mktemp("pipe")
  transformer = diffusers_dit(depth=2, sample_size=8, num_classes=1000, heads=2, head_dim=32)
  pipe = DiTPipeline(transformer=transformer, vae=_tiny_vae(),
                     scheduler=DDIMScheduler(beta_schedule="linear", clip_sample=False))
  pipe.save_pretrained(tmp / "pipe")
  convert(tmp / "pipe", tmp / "ckpt")
  return pipe, tmp


def test_pipeline_folder_bundles_its_vae_and_images_match_dit_pipeline(pipeline, monkeypatch):
  from diffusers.pipelines.dit import pipeline_dit

  pipe, tmp = pipeline
  assert (tmp / "ckpt" / "vae" / "dit_jax.json").exists()
  model, vae = dit_jax.load(tmp / "ckpt"), dit_jax.load_vae(tmp / "ckpt")
  assert vae.config.scaling_factor == pipe.vae.config.scaling_factor
  labels = [3, 999]
  x_T = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  monkeypatch.setattr(pipeline_dit, "randn_tensor", lambda *a, **k: torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy()))
  pipe.set_progress_bar_config(disable=True)
  ref = pipe(class_labels=labels, guidance_scale=4.0, num_inference_steps=10, output_type="np").images
  latents = sample(model, np.array(labels), method="ddim", respacing="ddim10", cfg_scale=4.0, noise=x_T)
  images = np.asarray(sample_files.vae_decoder(vae)(latents))
  ours = np.clip(images / 2 + 0.5, 0, 1)
  err = rel_err(ours, ref)
  assert ours.shape == ref.shape == (2, 16, 16, 3) and err < 1e-5, f"DiTPipeline images: rel err {err:.2e}"


def test_sample_py_decodes_with_the_bundled_vae(pipeline):
  _, tmp = pipeline
  out = tmp / "grid.png"
  result = subprocess.run([sys.executable, str(REPO / "sample.py"), "--checkpoint", str(tmp / "ckpt"),
                           "--class-labels", "1,2,3,4", "--method", "ddim", "--steps", "5", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  grid = np.asarray(Image.open(out))
  assert grid.shape == (2 * (16 + 2) + 2, 2 * (16 + 2) + 2, 3)


def test_sd_single_file_vae_and_export_round_trip(pipeline, tmp):
  pipe, ptmp = pipeline
  export(ptmp / "ckpt" / "vae", tmp / "vae_ldm.safetensors", layout="ldm")
  from safetensors.torch import load_file

  ldm = load_file(tmp / "vae_ldm.safetensors")
  single = {f"first_stage_model.{k}": v for k, v in ldm.items()}
  single["model.diffusion_model.x_embedder.proj.weight"] = torch.zeros(4)  # the rest of an SD single file
  single["cond_stage_model.transformer.w"] = torch.zeros(2)
  save_file(single, tmp / "sd_single.safetensors")
  convert(tmp / "sd_single.safetensors", tmp / "vae", vae_preset="sd-vae-ft-ema")
  vae = dit_jax.load_vae(tmp / "vae")
  z = np.random.default_rng(1).standard_normal((1, 8, 8, 4)).astype(np.float32)
  with torch.no_grad():
    ref = pipe.vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2).copy())).sample.numpy().transpose(0, 2, 3, 1)
  err = rel_err(vae.decode(jnp.asarray(z)), ref)
  assert err < 1e-5, f"LDM single-file VAE decode: rel err {err:.2e}"
  export(tmp / "vae", tmp / "back.safetensors", layout="diffusers")
  back = load_file(tmp / "back.safetensors")
  original = pipe.vae.state_dict()
  assert sorted(back) == sorted(original) and all(torch.equal(back[k], original[k]) for k in back)


def test_vae_errors(pipeline, tmp):
  _, ptmp = pipeline
  with pytest.raises(dit_jax.CheckpointError, match="holds no VAE"):
    dit_jax.load_vae(tmp)
  from dit_jax.convert import vae_tables
  vae_files = ptmp / "pipe" / "vae" / "diffusion_pytorch_model.safetensors"
  from safetensors.torch import load_file

  sd = load_file(vae_files)
  del sd["decoder.conv_out.bias"]
  save_file(sd, tmp / "broken_vae.safetensors")
  with pytest.raises(ConversionError, match="missing keys: decoder.conv_out.bias"):
    convert(tmp / "broken_vae.safetensors", tmp / "out")
  assert not (tmp / "out").exists()
  assert vae_tables.detect_layout({"encoder.down.0.block.0.conv1.weight": 0}) == "ldm"
