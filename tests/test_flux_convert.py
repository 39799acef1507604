"""FLUX.1 checkpoints end to end through tools/convert_torch.py: a BFL single file (a subprocess) against diffusers' own
single-file converter, a ComfyUI full checkpoint (prefixed transformer, first_stage_model.* VAE, text encoders left
out), a diffusers folder and a FluxPipeline folder with its vae/, BFL's ae.safetensors against diffusers'
AutoencoderKL.from_single_file, bit-exact export in both layouts, and strict one-line errors that write nothing."""
from __future__ import annotations

import json
import logging
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import dit_jax
from dit_jax import checkpoint
from dit_jax.convert import vae_tables
from dit_jax.convert.files import convert
from tests.helpers import rel_err
from tests.helpers.flux_reference import bfl_state_dict, diffusers_flux, diffusers_from_bfl, flux_forward
from tests.helpers.processes import one_line_error, run_cli
from tests.helpers.reference import ldm_state_dict, randomize_
from tools.convert_torch import main as cli

# 2 heads of 16 (rotary axes 4 + 6 + 6), one double and one single block, 16-channel latents (64 packed) as FLUX.1.
TINY = dict(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
AXES = ["--axes-dims-rope", "4,6,6"]  # a BFL file records no config: 16-wide heads need the rotary widths
HIDDEN = 32
PREFIX = "model.diffusion_model."
TEXT_KEY = "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"
TOL = 1e-5


def _vae():
  """A tiny diffusers AutoencoderKL shaped as FLUX's (16 latent channels, no quant convs, 32 groups)."""
  from diffusers import AutoencoderKL

  vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, layers_per_block=1,
                      latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                      shift_factor=0.1159)
  randomize_(vae, seed=5)
  return vae.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Sources from one dev-like and one schnell-like random model and one random VAE: BFL's flux1-dev and
  ae.safetensors, a ComfyUI schnell checkpoint, a diffusers transformer folder and a FluxPipeline folder."""
  root = tmp_path_factory.mktemp("flux")
  dev = diffusers_flux(seed=3, **TINY, guidance_embeds=True)
  schnell = diffusers_flux(seed=4, **TINY, guidance_embeds=False)
  vae = _vae()
  ae = ldm_state_dict({k: v.numpy() for k, v in vae.state_dict().items()}, 2)
  save_file(ae, root / "ae.safetensors")
  bfl = bfl_state_dict(dev.state_dict())
  save_file(bfl, root / "flux1-dev.safetensors")
  comfy = {PREFIX + k: v for k, v in bfl_state_dict(schnell.state_dict()).items()}
  comfy |= {f"first_stage_model.{k}": v for k, v in ae.items()}
  save_file({**comfy, TEXT_KEY: np.ones(8, np.float32)}, root / "comfy-schnell.safetensors")
  dev.save_pretrained(root / "transformer")
  pipe = root / "FLUX.1-dev"
  shutil.copytree(root / "transformer", pipe / "transformer")
  vae.save_pretrained(pipe / "vae")
  (pipe / "model_index.json").write_text(json.dumps({
      "_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
      "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
  return dict(root=root, dev=dev, schnell=schnell, vae=vae, bfl=bfl, ae=ae, comfy=comfy)


@pytest.fixture(scope="module")
def bfl_ckpt(files):
  """flux1-dev.safetensors + --vae ae.safetensors converted by tools/convert_torch.py in a subprocess."""
  root = files["root"]
  result = run_cli("tools/convert_torch.py", root / "flux1-dev.safetensors", root / "ckpt-dev", *AXES,
                   "--vae", root / "ae.safetensors")
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout, root / "ckpt-dev"


def _inputs(guidance: bool, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, 6, 10, 16)).astype(np.float32)
  context = rng.standard_normal((2, 7, TINY["joint_attention_dim"])).astype(np.float32)
  pooled = rng.standard_normal((2, TINY["pooled_projection_dim"])).astype(np.float32)
  return x, np.array([0.3, 1.0], np.float32), context, pooled, np.array([3.5, 1.0], np.float32) if guidance else None


def _diffusers_single_file(tensors: dict, guidance: bool):
  """A FluxTransformer2DModel filled strictly by diffusers' own BFL converter (the width made tiny)."""
  from diffusers import FluxTransformer2DModel

  model = FluxTransformer2DModel(**TINY, guidance_embeds=guidance)
  model.load_state_dict(diffusers_from_bfl(tensors, HIDDEN), strict=True)
  return model.eval()


def _parity(ours, ref, guidance: bool) -> float:
  x, t, context, pooled, g = _inputs(guidance)
  out = ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(context), jnp.asarray(pooled), g)
  return rel_err(out, flux_forward(ref, x, t, context, pooled, g))


def _same_params(a, b) -> bool:
  a, b = checkpoint.flat_params(a), checkpoint.flat_params(b)
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _same_tensors(got: dict, want: dict) -> bool:
  return got.keys() == want.keys() and all(
      got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and got[k].tobytes() == want[k].tobytes()
      for k in want)


def test_bfl_file_through_the_cli_matches_diffusers_single_file_loading(files, bfl_ckpt):
  printed, out = bfl_ckpt
  assert "FLUX double=1 single=1 hidden=32 heads=2 guidance_embeds=True in=64 out=64 rope=[4, 6, 6]" in printed
  assert "+ bundled VAE (latent=16 scale=0.3611 shift=0.1159)" in printed
  ref = _diffusers_single_file(load_file(files["root"] / "flux1-dev.safetensors"), guidance=True)
  err = _parity(dit_jax.load(out), ref, guidance=True)
  assert err <= TOL, f"BFL file through the CLI vs diffusers' single-file loading: relative error {err:.2e}"
  assert _same_tensors(vae_tables.from_model(dit_jax.load_vae(out), "ldm"), files["ae"])  # --vae ae.safetensors


def test_comfy_checkpoint(files, tmp, caplog, capsys):
  """ComfyUI's prefix, its first_stage_model.* VAE bundled with FLUX's scales, its text encoders left out."""
  with caplog.at_level(logging.INFO, logger="dit_jax"):
    assert cli([str(files["root"] / "comfy-schnell.safetensors"), str(tmp / "ckpt"), *AXES,
                "--no-text-encoders"]) == 0
  assert "leaving out 1 text-encoder tensors" in caplog.text
  printed = capsys.readouterr().out
  assert "guidance_embeds=False" in printed and "+ bundled VAE (latent=16 scale=0.3611 shift=0.1159)" in printed
  ref = _diffusers_single_file({k: v for k, v in files["comfy"].items() if k.startswith(PREFIX)}, guidance=False)
  err = _parity(dit_jax.load(tmp / "ckpt"), ref, guidance=False)
  assert err <= TOL, f"ComfyUI file vs diffusers' single-file loading: relative error {err:.2e}"
  assert _same_tensors(vae_tables.from_model(dit_jax.load_vae(tmp / "ckpt"), "ldm"), files["ae"])


def test_diffusers_folder_and_pipeline_folder(files, bfl_ckpt, tmp):
  root, same = files["root"], dit_jax.load(bfl_ckpt[1])
  convert(root / "transformer", tmp / "folder")
  assert _same_params(dit_jax.load(tmp / "folder"), same) and not (tmp / "folder" / "vae").exists()
  assert cli([str(root / "FLUX.1-dev"), str(tmp / "pipe")]) == 0
  assert _same_params(dit_jax.load(tmp / "pipe"), same)
  vae = dit_jax.load_vae(tmp / "pipe")
  assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.3611, 0.1159)  # from vae/config.json
  folder_vae = load_file(root / "FLUX.1-dev" / "vae" / "diffusion_pytorch_model.safetensors")
  assert _same_tensors(vae_tables.from_model(vae, "diffusers"), folder_vae)


def test_ae_safetensors_matches_diffusers(files, tmp, capsys, monkeypatch):
  """BFL's ae.safetensors alone: FLUX's latent scales, decode as diffusers' own LDM single-file loading, and back."""
  from diffusers import AutoencoderKL

  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  ae = files["root"] / "ae.safetensors"
  assert cli([str(ae), str(tmp / "vae")]) == 0
  assert "latent=16 scale=0.3611 shift=0.1159" in capsys.readouterr().out
  ours = dit_jax.load_vae(tmp / "vae")
  assert (ours.config.scaling_factor, ours.config.shift_factor, ours.config.latent_channels) == (0.3611, 0.1159, 16)
  z = jnp.linspace(-2, 2, 32).reshape(1, 2, 1, 16)
  np.testing.assert_allclose(ours.scale_latents(z), 0.3611 * (z - 0.1159), rtol=1e-6)  # BFL's encode scaling
  ref = AutoencoderKL.from_single_file(str(ae), config=str(files["root"] / "FLUX.1-dev" / "vae"),
                                       local_files_only=True).eval()
  latents = np.random.default_rng(2).standard_normal((2, 4, 6, 16)).astype(np.float32)
  with torch.no_grad():
    want = ref.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())).sample.numpy().transpose(0, 2, 3, 1)
  err = rel_err(ours.decode(jnp.asarray(latents)), want)
  assert err <= 1e-4, f"ae.safetensors decode vs diffusers AutoencoderKL.from_single_file: relative error {err:.2e}"
  assert cli([str(tmp / "vae"), str(tmp / "ae.safetensors"), "--to", "torch"]) == 0  # ldm layout: BFL's keys
  assert _same_tensors(load_file(tmp / "ae.safetensors"), files["ae"])


def test_round_trips_are_bit_exact(files, bfl_ckpt, tmp):
  """convert -> export through the CLI in both layouts (and 'original' = bfl), fp32 and bf16."""
  root, out = files["root"], bfl_ckpt[1]
  diffusers_file = load_file(root / "transformer" / "diffusion_pytorch_model.safetensors")
  for layout, want in (("bfl", files["bfl"]), ("original", files["bfl"]), ("diffusers", diffusers_file)):
    assert cli([str(out), str(tmp / f"{layout}.safetensors"), "--to", "torch", "--layout", layout]) == 0
    assert _same_tensors(load_file(tmp / f"{layout}.safetensors"), want), layout
  bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in files["bfl"].items()}
  save_file(bf16, tmp / "bf16.safetensors")
  assert cli([str(tmp / "bf16.safetensors"), str(tmp / "bf16"), *AXES]) == 0
  assert cli([str(tmp / "bf16"), str(tmp / "back.safetensors"), "--to", "torch", "--layout", "bfl"]) == 0
  assert _same_tensors(load_file(tmp / "back.safetensors"), bf16)


def test_bad_inputs_are_one_line_errors_and_write_nothing(files, bfl_ckpt, tmp, capsys):
  root, bfl, out = files["root"], files["bfl"], tmp / "out"
  data = (root / "flux1-dev.safetensors").read_bytes()
  (tmp / "truncated.safetensors").write_bytes(data[: len(data) // 2])

  def bad(name: str, tensors: dict) -> str:
    save_file(tensors, tmp / name)
    return str(tmp / name)

  nan = {**bfl, "img_in.bias": np.full_like(bfl["img_in.bias"], np.nan)}
  folder = tmp / "contradicting"
  shutil.copytree(root / "transformer", folder)
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**config, "num_layers": 2}))
  cases = (
      ([str(tmp / "truncated.safetensors"), *AXES], "is truncated or not a safetensors file"),
      ([bad("missing.safetensors", {k: v for k, v in bfl.items() if k != "single_blocks.0.linear2.bias"}), *AXES],
       "missing keys: single_blocks.0.linear2.bias"),
      ([bad("shape.safetensors", {**bfl, "final_layer.linear.bias": np.zeros(63, np.float32)}), *AXES],
       "wrong shape: final_layer.linear.bias (63,), expected (64,)"),
      ([str(folder)], "num_layers=2 but the weights have 1"),
      ([bad("nan.safetensors", nan), *AXES], "NaN or Inf values in img_in.bias"),
      ([bad("extra.safetensors", {**files["comfy"], "vae.decoder.conv_in.weight": np.zeros(1, np.float32)}),
        *AXES], "unknown top-level keys next to the model.diffusion_model.* FLUX transformer: vae.decoder"),
      ([str(root / "flux1-dev.safetensors")], "cannot infer axes_dims_rope for 16-wide heads"),
      ([str(root / "flux1-dev.safetensors"), "--axes-dims-rope", "4,6,8"], "summing to attention_head_dim 16"),
      ([str(root / "transformer"), "--axes-dims-rope", "4,8,4"], "contradicts config.json's [4, 6, 6]"),
      ([str(root / "flux1-dev.safetensors"), *AXES, "--num-heads", "2"], "num_heads do not apply to a FLUX"),
      ([str(root / "flux1-dev.safetensors"), *AXES, "--format", "stability"], "in the bfl layout, not stability"),
      ([str(root / "transformer"), "--format", "bfl"], "in the diffusers layout, not bfl"),
      ([str(root / "flux1-dev.safetensors"), *AXES, "--vae-preset", "flux"],
       "--vae-preset flux applies to a VAE, and this FLUX transformer is converted without one"),
      ([str(root / "flux1-dev.safetensors"), *AXES, "--vae", str(root / "flux1-dev.safetensors")],
       "not an AutoencoderKL state dict"),
      ([str(root / "ae.safetensors"), *AXES], "is not a FLUX transformer: axes_dims_rope applies to FLUX only"),
      ([str(root / "ae.safetensors"), "--format", "bfl"], "the bfl layout applies to FLUX checkpoints only"),
  )
  for args, fragment in cases:
    one_line_error(cli([args[0], str(out), *args[1:]]), capsys.readouterr().err, fragment)
    assert not out.exists(), args
  code = cli([str(bfl_ckpt[1]), str(tmp / "x.safetensors"), "--to", "torch", "--layout", "stability"])
  one_line_error(code, capsys.readouterr().err, "a flux checkpoint exports in the diffusers / bfl layout, not "
                                                "'stability'")
  assert not (tmp / "x.safetensors").exists()
