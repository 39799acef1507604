"""Converter: formats, training checkpoints, bit-exact export, and one-line errors for every bad input."""
from __future__ import annotations

import argparse
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import dit_jax
from dit_jax.checkpoint import CheckpointError
from dit_jax.convert import ConversionError
from dit_jax.convert.files import convert, export
from tests.helpers.processes import one_line_error, run_cli
from tests.helpers.reference import as_original_convention_, diffusers_dit, original_state_dict


@pytest.fixture(scope="module")
def original_sd():
  model = diffusers_dit(depth=2, sample_size=8)
  as_original_convention_(model)
  return original_state_dict(model)


def _cli(*args):
  return run_cli("tools/convert_torch.py", *args)


def _assert_same_tensors(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.bool else a[k], b[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_original_round_trip_is_bit_exact(tmp, original_sd, dtype):
  sd = {k: v.to(dtype) for k, v in original_sd.items()}
  torch.save(sd, tmp / "dit.pt")
  result = _cli(tmp / "dit.pt", tmp / "ckpt")
  assert result.returncode == 0, result.stderr
  result = _cli(tmp / "ckpt", tmp / "back.safetensors", "--to", "torch")
  assert result.returncode == 0, result.stderr
  _assert_same_tensors(load_file(tmp / "back.safetensors"), sd)


def test_diffusers_round_trip_is_bit_exact(tmp):
  model = diffusers_dit(depth=2)
  model.save_pretrained(tmp / "dit")
  convert(tmp / "dit", tmp / "ckpt")
  export(tmp / "ckpt", tmp / "back.safetensors", layout="diffusers")
  _assert_same_tensors(load_file(tmp / "back.safetensors"), load_file(tmp / "dit" / "diffusion_pytorch_model.safetensors"))


def test_original_safetensors_and_layout_switch(tmp, original_sd):
  """A bare .safetensors in the original layout converts; exporting it in diffusers keys and re-importing it
  gives the same parameters (conventions travel with the checkpoint config, not the file)."""
  save_file(original_sd, tmp / "dit.safetensors")
  convert(tmp / "dit.safetensors", tmp / "a")
  export(tmp / "a", tmp / "d.safetensors", layout="diffusers")
  a = dit_jax.checkpoint.flat_params(dit_jax.load(tmp / "a"))
  convert(tmp / "d.safetensors", tmp / "b", input_size=8, num_heads=4)
  b = dit_jax.checkpoint.flat_params(dit_jax.load(tmp / "b"))
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_training_checkpoint_uses_ema_by_default(tmp, original_sd):
  model_sd = {k: v + 1.0 for k, v in original_sd.items()}
  ckpt = {"model": model_sd, "ema": original_sd, "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
          "args": argparse.Namespace(model="DiT-S/2", global_batch_size=256)}
  torch.save(ckpt, tmp / "0400000.pt")
  convert(tmp / "0400000.pt", tmp / "ema")
  convert(tmp / "0400000.pt", tmp / "model", weights="model")
  ema = dit_jax.load(tmp / "ema").y_embedder.embedding_table.embedding[...]
  raw = dit_jax.load(tmp / "model").y_embedder.embedding_table.embedding[...]
  np.testing.assert_array_equal(ema, original_sd["y_embedder.embedding_table.weight"].numpy())
  np.testing.assert_array_equal(raw, model_sd["y_embedder.embedding_table.weight"].numpy())


class _Payload:
  def __reduce__(self):
    return (print, ("this must never run",))


def _bad_inputs(tmp, sd):
  """name -> (path, expected fragment of the one-line error)."""
  (tmp / "notes.txt").write_text("hello")
  torch.save(sd, tmp / "good.pt")
  data = (tmp / "good.pt").read_bytes()
  (tmp / "truncated.pt").write_bytes(data[: len(data) // 2])
  save_file(sd, tmp / "good.safetensors")
  st = (tmp / "good.safetensors").read_bytes()
  (tmp / "truncated.safetensors").write_bytes(st[: len(st) // 2])
  missing = dict(sd)
  del missing["blocks.1.mlp.fc2.bias"]
  torch.save(missing, tmp / "missing.pt")
  torch.save({**sd, "blocks.0.attn.extra.weight": torch.zeros(3)}, tmp / "extra.pt")
  torch.save({**sd, "blocks.1.mlp.fc1.weight": torch.zeros(5, 64)}, tmp / "shape.pt")
  torch.save({"net": torch.nn.Linear(2, 2)}, tmp / "module.pt")
  (tmp / "evil.pt").write_bytes(pickle.dumps(_Payload(), protocol=2))
  torch.save({"a": torch.zeros(2), "b": 3}, tmp / "mixed.pt")
  torch.save({"encoder.weight": torch.zeros(2)}, tmp / "other_model.pt")
  return {
      "wrong file": (tmp / "notes.txt", "not a PyTorch checkpoint"),
      "no such file": (tmp / "absent.pt", "does not exist"),
      "truncated .pt": (tmp / "truncated.pt", "truncated"),
      "truncated safetensors": (tmp / "truncated.safetensors", "truncated"),
      "missing key": (tmp / "missing.pt", "missing keys: blocks.1.mlp.fc2.bias"),
      "extra key": (tmp / "extra.pt", "unexpected keys: blocks.0.attn.extra.weight"),
      "wrong shape": (tmp / "shape.pt", "wrong shape: blocks.1.mlp.fc1.weight (5, 64), expected (256, 64)"),
      "pickled module": (tmp / "module.pt", "not a plain tensor state dict"),
      "malicious pickle": (tmp / "evil.pt", "not a"),
      "non-tensor entry": (tmp / "mixed.pt", "entry 'b' is a int"),
      "not a DiT": (tmp / "other_model.pt", "not a DiT state dict"),
  }


def test_every_bad_input_gets_a_one_line_error(tmp, original_sd):
  cases = _bad_inputs(tmp, original_sd)
  for name, (path, fragment) in cases.items():
    out = tmp / f"out-{name.replace(' ', '_')}"
    with pytest.raises(ConversionError) as info:
      convert(path, out)
    message = str(info.value)
    assert fragment in message and "\n" not in message, f"{name}: {message!r}"
    assert not out.exists(), f"{name}: a failed conversion left {out}"


def test_cli_reports_one_line_without_traceback(tmp, original_sd):
  cases = _bad_inputs(tmp, original_sd)
  for name in ("wrong file", "malicious pickle", "missing key", "wrong shape"):
    path, fragment = cases[name]
    result = _cli(path, tmp / "out")
    one_line_error(result.returncode, result.stderr, fragment)
    assert "this must never run" not in result.stdout + result.stderr
  assert not (tmp / "out").exists()
  for args, fragment in (([], "the following arguments are required: src, out"),
                         ([tmp / "notes.txt", tmp / "out", "--to", "pytorch"], "argument --to: invalid choice"),
                         ([tmp / "notes.txt", tmp / "out", "--num-heads", "four"], "invalid int value: 'four'")):
    result = _cli(*args)
    one_line_error(result.returncode, result.stderr, fragment)
  assert not (tmp / "out").exists()


def test_existing_output_is_never_clobbered(tmp, original_sd):
  torch.save(original_sd, tmp / "dit.pt")
  (tmp / "ckpt").mkdir()
  (tmp / "ckpt" / "precious.txt").write_text("keep me")
  result = _cli(tmp / "dit.pt", tmp / "ckpt")
  one_line_error(result.returncode, result.stderr, "already exists")
  assert (tmp / "ckpt" / "precious.txt").read_text() == "keep me"
  # a failed overwrite also leaves the old directory intact
  torch.save({**original_sd, "junk": torch.zeros(1)}, tmp / "bad.pt")
  result = _cli(tmp / "bad.pt", tmp / "ckpt", "--overwrite")
  one_line_error(result.returncode, result.stderr, "unexpected keys: junk")
  assert (tmp / "ckpt" / "precious.txt").read_text() == "keep me"
  assert _cli(tmp / "dit.pt", tmp / "ckpt", "--overwrite").returncode == 0
  assert dit_jax.load(tmp / "ckpt").config.depth == 2
  (tmp / "back.safetensors").write_text("old")
  result = _cli(tmp / "ckpt", tmp / "back.safetensors", "--to", "torch")
  one_line_error(result.returncode, result.stderr, "already exists")
  assert (tmp / "back.safetensors").read_text() == "old"


def test_untied_diffusers_embedders_are_rejected(tmp):
  model = diffusers_dit(depth=2)
  with torch.no_grad():
    model.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.weight.add_(1e-3)
  model.save_pretrained(tmp / "dit")
  with pytest.raises(ConversionError, match="tied copies differ"):
    convert(tmp / "dit", tmp / "ckpt")


def test_training_checkpoint_options(tmp, original_sd):
  torch.save({"model": original_sd}, tmp / "only_model.pt")
  convert(tmp / "only_model.pt", tmp / "a")  # no EMA entry: falls back to the model weights
  with pytest.raises(ConversionError, match="no 'ema' weights"):
    convert(tmp / "only_model.pt", tmp / "b", weights="ema")
  torch.save(original_sd, tmp / "plain.pt")
  with pytest.raises(ConversionError, match="training checkpoints only"):
    convert(tmp / "plain.pt", tmp / "c", weights="model")


def test_load_errors_are_one_line(tmp):
  for path, fragment in ((tmp / "absent", "not a checkpoint directory"), (tmp, "no dit_jax.json")):
    with pytest.raises(CheckpointError, match=fragment):
      dit_jax.load(path)
  (tmp / "dit_jax.json").write_text("{broken")
  with pytest.raises(CheckpointError, match="corrupt"):
    dit_jax.load(tmp)


def test_model_without_null_class_row(tmp, original_sd):
  """A model trained with class_dropout_prob=0 has no null row: --num-classes says so."""
  sd = dict(original_sd)
  sd["y_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"][:-1].clone()  # 10 rows
  torch.save(sd, tmp / "dit.pt")
  assert convert(tmp / "dit.pt", tmp / "a").num_classes == 9  # default: last row is the null class
  cfg = convert(tmp / "dit.pt", tmp / "b", num_classes=10)
  assert (cfg.num_classes, cfg.class_dropout_prob) == (10, 0.0)
  assert dit_jax.load(tmp / "b").y_embedder.embedding_table.embedding.shape == (10, 64)
  with pytest.raises(ConversionError, match="label table has 10 rows"):
    convert(tmp / "dit.pt", tmp / "c", num_classes=5)
