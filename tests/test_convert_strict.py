"""Strict conversion: non-float and NaN / Inf weights, diffusers config.json files that are malformed, name another
class, hold impossible values or contradict the weights, and bad option values are each one one-line
ConversionError (status 2 and one stderr line from tools/convert_torch.py) that leaves what is on disk alone."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import dit_jax
from dit_jax.convert import ConversionError, dit_tables, engine, mmdit_tables, vae_tables
from dit_jax.convert.files import convert, convert_vae, export
from tests.helpers.processes import one_line_error, run_cli
from tests.helpers.reference import (SD3_TINY, as_original_convention_, diffusers_dit, diffusers_sd3,
                                     original_state_dict, randomize_)
from tools.convert_torch import main as cli

KEY = "blocks.1.mlp.fc1.weight"


def _error(fn, *args, **kwargs) -> str:
  with pytest.raises(ConversionError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message, message
  return message


def _cli(*args):
  return run_cli("tools/convert_torch.py", *args)


@pytest.fixture(scope="module")
def original_sd():
  model = diffusers_dit(depth=2, sample_size=8)
  as_original_convention_(model)
  return original_state_dict(model)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """name -> a diffusers folder (DiT, SD3 transformer, AutoencoderKL) saved with save_pretrained."""
  from diffusers import AutoencoderKL

  root = tmp_path_factory.mktemp("folders")
  diffusers_dit(depth=2).save_pretrained(root / "dit")
  diffusers_sd3(qk_norm="rms_norm", dual_attention_layers=(0,)).save_pretrained(root / "sd3")
  vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4,
                      layers_per_block=1)
  randomize_(vae, seed=1)
  vae.save_pretrained(root / "vae")
  return root


def _with_config(folders, tmp, name: str, edit) -> str:
  """A copy of folder ``name`` whose config.json is ``edit(config)`` (a dict to merge, or any JSON value)."""
  import shutil

  dst = tmp / f"{name}_edited"
  shutil.copytree(folders / name, dst)
  config = json.loads((dst / "config.json").read_text())
  new = {**config, **edit} if isinstance(edit, dict) else edit
  (dst / "config.json").write_text(json.dumps(new))
  return dst


# --- dtypes -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.complex64, torch.uint8], ids=str)
def test_non_float_weights_are_refused(tmp, original_sd, dtype):
  sd = {**original_sd, KEY: original_sd[KEY].to(dtype)}
  torch.save(sd, tmp / "dit.pt")
  name = str(dtype).removeprefix("torch.")
  message = _error(convert, tmp / "dit.pt", tmp / "out")
  assert f"not a float dtype (float16/bfloat16/float32/float64): {KEY} ({name})" in message, message
  assert not (tmp / "out").exists()


def test_non_float_safetensors_listed_before_reading(tmp, original_sd):
  """Dtypes come from the header: every offender listed, nothing read."""
  bad = ("blocks.0.attn.qkv.bias", "pos_embed", "y_embedder.embedding_table.weight")
  save_file({**original_sd, **{k: original_sd[k].to(torch.int32) for k in bad}}, tmp / "dit.safetensors")
  message = _error(convert, tmp / "dit.safetensors", tmp / "out")
  assert all(f"{k} (int32)" in message for k in bad), message


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_every_float_dtype_converts(tmp, original_sd, dtype):
  torch.save({k: v.to(dtype) for k, v in original_sd.items()}, tmp / "dit.pt")
  convert(tmp / "dit.pt", tmp / "out")
  assert dit_jax.checkpoint.read_meta(tmp / "out")["source"]["dtype"] == str(dtype).removeprefix("torch.")
  assert engine.FLOAT_DTYPES == ("float16", "bfloat16", "float32", "float64")


# --- NaN / Inf --------------------------------------------------------------------------------------------------


def test_nonfinite_weights_are_refused_unless_allowed(tmp, original_sd):
  sd = dict(original_sd)
  sd[KEY] = sd[KEY].clone()
  sd[KEY][3, 5] = float("nan")
  sd["final_layer.linear.bias"] = sd["final_layer.linear.bias"].clone()
  sd["final_layer.linear.bias"][0] = float("-inf")
  save_file(sd, tmp / "dit.safetensors")
  message = _error(convert, tmp / "dit.safetensors", tmp / "out")
  assert f"NaN or Inf values in {KEY}, final_layer.linear.bias" in message and "allow_nonfinite" in message
  assert not (tmp / "out").exists()
  convert(tmp / "dit.safetensors", tmp / "out", allow_nonfinite=True)
  kernel = np.asarray(dit_jax.load(tmp / "out").blocks[1].mlp.fc1.kernel[...])
  assert np.isnan(kernel[5, 3]) and np.isfinite(np.delete(kernel.ravel(), 5 * kernel.shape[1] + 3)).all()


def test_nonfinite_in_one_tied_copy_and_bf16(tmp):
  """diffusers' per-block embedder copies are each checked; a bf16 Inf is found as well."""
  model = diffusers_dit(depth=2)
  sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
  key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"
  sd[key] = sd[key].clone()
  sd[key][0] = float("inf")
  save_file(sd, tmp / "dit.safetensors")
  message = _error(convert, tmp / "dit.safetensors", tmp / "out", input_size=16, num_heads=4)
  assert f"NaN or Inf values in {key}" in message, message
  for array, found in ((np.ones(5, np.float16), False), (np.array([[0, 1], [2, np.nan]], np.float32), True),
                       (np.array([0, -np.inf, 1]), True)):
    assert engine.has_nonfinite(array, chunk=2) == found


def test_nonfinite_vae_and_the_api_flags(folders, tmp):
  from safetensors.torch import load_file

  sd = load_file(folders / "vae" / "diffusion_pytorch_model.safetensors")
  sd["decoder.conv_out.bias"] = sd["decoder.conv_out.bias"].clone()
  sd["decoder.conv_out.bias"][1] = float("nan")
  save_file(sd, tmp / "vae.safetensors")
  assert "NaN or Inf values in decoder.conv_out.bias" in _error(convert_vae, tmp / "vae.safetensors")
  model, _ = convert_vae(tmp / "vae.safetensors", allow_nonfinite=True)
  assert np.isnan(np.asarray(model.decoder.conv_out.bias[...])[1])
  source = dit_jax.convert.read_source(tmp / "vae.safetensors")
  cfg = vae_tables.infer_config(source.tensors, "diffusers", scaling_factor=0.18215, norm_num_groups=8)
  assert "NaN or Inf" in _error(vae_tables.to_model, source.tensors, cfg, "diffusers")
  vae_tables.to_model(source.tensors, cfg, "diffusers", allow_nonfinite=True)


# --- config.json ------------------------------------------------------------------------------------------------


BAD_CONFIGS = {  # name -> (folder, config edit, expected fragment)
    "list": ("dit", [1, 2], "is not a JSON object (got list)"),
    "string": ("vae", "AutoencoderKL", "is not a JSON object (got str)"),
    "SD3 config over DiT weights": ("dit", {"_class_name": "SD3Transformer2DModel"},
                                    "describes 'SD3Transformer2DModel', not DiTTransformer2DModel / Transformer2DModel"),
    "unknown class": ("dit", {"_class_name": "Nope"}, "describes 'Nope'"),
    "DiT config over SD3 weights": ("sd3", {"_class_name": "DiTTransformer2DModel"},
                                    "describes 'DiTTransformer2DModel', not SD3Transformer2DModel"),
    "UNet config over a VAE": ("vae", {"_class_name": "UNet2DConditionModel"}, "describes 'UNet2DConditionModel', not AutoencoderKL"),
    "negative layers": ("dit", {"num_layers": -3}, "num_layers=-3 is not a positive integer"),
    "zero heads": ("sd3", {"num_attention_heads": 0}, "num_attention_heads=0 is not a positive integer"),
    "string int": ("dit", {"patch_size": "2"}, "patch_size='2' is not a positive integer"),
    "float int": ("vae", {"layers_per_block": 1.5}, "layers_per_block=1.5 is not a positive integer"),
    "bool int": ("sd3", {"num_layers": True}, "num_layers=True is not a positive integer"),
    "bad list": ("vae", {"block_out_channels": [32, "64"]}, "block_out_channels=[32, '64'] is not a list"),
    "bad number": ("vae", {"scaling_factor": "0.18"}, "scaling_factor='0.18' is not a finite number"),
    "DiT depth": ("dit", {"num_layers": 3}, "config.json contradicts the weights: num_layers=3 but the weights have 2"),
    "DiT channels": ("dit", {"in_channels": 8}, "in_channels=8 but the weights have 4"),
    "DiT classes": ("dit", {"num_embeds_ada_norm": 7}, "num_embeds_ada_norm=7 but the weights have 10"),
    "DiT head split": ("dit", {"num_attention_heads": 4, "attention_head_dim": 32}, "attention_head_dim=32 but"),
    "SD3 depth": ("sd3", {"num_layers": 2}, "num_layers=2 but the weights have 3"),
    "SD3 qk norm": ("sd3", {"qk_norm": None}, "qk_norm=None but the weights have 'rms_norm'"),
    "SD3 dual attention": ("sd3", {"dual_attention_layers": [0, 1]}, "dual_attention_layers=[0, 1] but"),
    "SD3 context": ("sd3", {"joint_attention_dim": 25}, "joint_attention_dim=25 but the weights have 24"),
    "SD3 head width": ("sd3", {"attention_head_dim": 8, "num_attention_heads": 4}, "attention_head_dim=8 but"),
    "VAE latents": ("vae", {"latent_channels": 16}, "latent_channels=16 but the weights have 4"),
    "VAE levels": ("vae", {"block_out_channels": [32, 64, 64]}, "block_out_channels=[32, 64, 64] but"),
    "VAE quant conv": ("vae", {"use_quant_conv": False}, "use_quant_conv=False but the weights have True"),
}


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_bad_config_json_is_refused(folders, tmp, name):
  folder, edit, fragment = BAD_CONFIGS[name]
  src = _with_config(folders, tmp, folder, edit)
  message = _error(convert, src, tmp / "out")
  assert fragment in message, f"{name}: {message}"
  assert not (tmp / "out").exists()


def test_config_helpers_and_every_infer_config():
  """checked_config / config_agrees directly, and each family's infer_config refusing a foreign config dict."""
  assert engine.checked_config(None, ("A",), "n") == {}
  assert engine.checked_config({"_class_name": "A", "n": 3, "m": None}, ("A",), "n", "m")["n"] == 3
  engine.config_agrees({"n": 3, "out": None, "l": [1, 2]}, n=3, out=5, l=(1, 2))  # null: the default
  assert "out=None but the weights have 5" in _error(engine.config_agrees, {"out": None}, nullable=("out",), out=5)
  assert "a=1 but the weights have 2; b=2 but the weights have 3" in _error(engine.config_agrees, {"a": 1, "b": 2},
                                                                            a=2, b=3)
  for tables, classes in ((dit_tables, ("DiTTransformer2DModel", "Transformer2DModel")),
                          (mmdit_tables, ("SD3Transformer2DModel",)), (vae_tables, ("AutoencoderKL",))):
    assert tables.CONFIG_CLASSES == classes
    layout = next(iter(tables.LAYOUTS))
    assert "describes 'CLIPTextModel'" in _error(tables.infer_config, {}, layout, {"_class_name": "CLIPTextModel"})
    assert "is not a JSON object" in _error(tables.infer_config, {}, layout, ["x"])


def test_good_config_still_converts(folders, tmp):
  """The real configs pass: all three folders convert, and the SD3 config's sample_size is used."""
  for name in ("dit", "sd3", "vae"):
    convert(folders / name, tmp / name)
  assert dit_jax.load(tmp / "sd3").config.sample_size == SD3_TINY["sample_size"]


# --- option values ----------------------------------------------------------------------------------------------


def test_options_are_checked_before_reading(tmp, original_sd):
  """Bad option values fail first (the source does not even exist), and a preset with no VAE to apply it to fails."""
  absent = tmp / "absent.pt"
  for kwargs, fragment in ((dict(vae_preset="nope"), "unknown VAE preset 'nope'; choose one of sd-vae-ft-ema"),
                           (dict(num_heads=0), "num_heads=0 is not a positive integer"),
                           (dict(input_size=-4), "input_size=-4 is not a positive integer"),
                           (dict(num_classes=2.5), "num_classes=2.5 is not a positive integer"),
                           (dict(layout="sd3"), "unknown layout 'sd3'"),
                           (dict(weights="best"), "weights='best'"),
                           (dict(vae=tmp / "vae", bundle_vae=False), "contradict each other")):
    assert fragment in _error(convert, absent, tmp / "out", **kwargs), kwargs
  assert "unknown VAE preset" in _error(convert_vae, absent, preset="nope")
  torch.save(original_sd, tmp / "dit.pt")
  message = _error(convert, tmp / "dit.pt", tmp / "out", vae_preset="sdxl")
  assert "--vae-preset sdxl applies to a VAE, and this DiT is converted without one" in message
  assert not (tmp / "out").exists()


def test_export_options_are_checked_before_loading(tmp, original_sd):
  torch.save(original_sd, tmp / "dit.pt")
  convert(tmp / "dit.pt", tmp / "ckpt")
  assert "dtype 'int8' is not a float dtype" in _error(export, tmp / "ckpt", tmp / "x.safetensors", dtype="int8")
  assert "a dit checkpoint exports in the original / diffusers layout, not 'stability'" in _error(export, tmp / "ckpt", tmp / "x.safetensors", layout="stability")
  assert not (tmp / "x.safetensors").exists()


# --- through the CLI --------------------------------------------------------------------------------------------


def test_cli_strict_errors_are_one_line_and_keep_the_output(tmp, original_sd, folders, capsys):
  """tools/convert_torch.py's main in this process (status and stderr), and once as a real subprocess."""
  out = tmp / "ckpt"
  out.mkdir()
  (out / "precious.txt").write_text("keep me")
  torch.save({**original_sd, KEY: original_sd[KEY].to(torch.int64)}, tmp / "int.pt")
  nan = {**original_sd, KEY: original_sd[KEY].clone()}
  nan[KEY][0, 0] = float("nan")
  torch.save(nan, tmp / "nan.pt")
  torch.save(original_sd, tmp / "good.pt")
  sd3_over_dit = _with_config(folders, tmp, "dit", {"_class_name": "SD3Transformer2DModel"})
  result = _cli(tmp / "int.pt", out, "--overwrite")
  one_line_error(result.returncode, result.stderr, f"{KEY} (int64)")
  for args, fragment in (([tmp / "nan.pt"], f"NaN or Inf values in {KEY} (pass allow_nonfinite=True / "
                                            "--allow-nonfinite"),
                         ([sd3_over_dit], "describes 'SD3Transformer2DModel'"),
                         ([tmp / "good.pt", "--vae-preset", "nope"], "argument --vae-preset: invalid choice: 'nope'"),
                         ([tmp / "good.pt", "--vae-preset", "sdxl"], "--vae-preset sdxl applies to a VAE"),
                         ([tmp / "good.pt", "--num-heads", "0"], "num_heads=0 is not a positive integer")):
    code = cli([str(args[0]), str(out), "--overwrite", *args[1:]])
    one_line_error(code, capsys.readouterr().err, fragment)
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"], args
  assert cli([str(tmp / "nan.pt"), str(out), "--overwrite", "--allow-nonfinite"]) == 0
  assert np.isnan(np.asarray(dit_jax.load(out).blocks[1].mlp.fc1.kernel[...])[0, 0])
  code = cli([str(out), str(tmp / "x.safetensors"), "--to", "torch", "--dtype", "int8"])
  one_line_error(code, capsys.readouterr().err, "argument --dtype: invalid choice: 'int8'")


def test_sharded_folder_errors(tmp, original_sd):
  """A key in two shards, a shard the index names but the folder lacks, and an index without a weight_map."""
  folder = tmp / "dit"
  folder.mkdir()
  keys = sorted(original_sd)
  save_file({k: original_sd[k] for k in keys[:5]}, folder / "a.safetensors")
  save_file({k: original_sd[k] for k in keys[4:]}, folder / "b.safetensors")
  index = folder / "diffusion_pytorch_model.safetensors.index.json"
  index.write_text(json.dumps({"weight_map": {k: "a.safetensors" if i < 5 else "b.safetensors"
                                              for i, k in enumerate(keys)}}))
  assert f"tensor {keys[4]} is in two shards" in _error(convert, folder, tmp / "out")
  index.write_text(json.dumps({"weight_map": {keys[0]: "c.safetensors"}}))
  assert "names shard c.safetensors, which does not exist" in _error(convert, folder, tmp / "out")
  index.write_text("[1]")
  assert "has no weight_map" in _error(convert, folder, tmp / "out")
  index.write_text("{broken")
  assert "is not valid JSON" in _error(convert, folder, tmp / "out")
  assert not (tmp / "out").exists()
