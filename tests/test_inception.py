"""FID Inception-v3 parity: dit_jax.eval.inception (converted by dit_jax.convert.inception_tables) against
torch-fidelity's FeatureExtractorInceptionV3 (its TF1 resize included) on uint8 images of three sizes, against
pytorch-fid's InceptionV3 (FID weights variant) on 299 x 299 input, the TF1 resize alone, and the converter's strict
errors. Random weights (BatchNorm statistics included), fp32 'highest'."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dit_jax.convert import inception_tables
from dit_jax.convert.readers import ConversionError
from dit_jax.eval import inception
from tests.helpers import inception_reference as ref

TOL = 1e-4  # relative max-abs error (issue 14); the TF1 resize alone: 1e-5


def rel_err(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def _convert(state: dict[str, torch.Tensor]) -> inception.InceptionV3:
  tensors = {k: v.numpy() for k, v in state.items()}
  layout = inception_tables.detect_layout(tensors)
  return inception_tables.to_model(tensors, inception_tables.infer_config(tensors, layout), layout)


@pytest.fixture(scope="module")
def network():
  """features(model, x) jitted once for the module: every converted model shares the compiled 299 x 299 network."""
  return nnx.jit(lambda m, x: m.features(x))


@pytest.fixture(scope="module")
def fidelity(tmp_path_factory, network):
  """(torch-fidelity extractor loaded from its random weights file, our converted model, jitted network)."""
  path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
  state = ref.torch_fidelity_file(path)
  return ref.torch_fidelity_extractor(path), _convert(state), network


@pytest.mark.parametrize("height,width", [(64, 64), (256, 256), (512, 384)])
def test_matches_torch_fidelity(fidelity, height, width):
  theirs_model, model, network = fidelity
  images = ref.random_images(2, height, width, seed=height + width)
  theirs = ref.torch_fidelity_features(theirs_model, images)
  x = jax.jit(inception.preprocess)(jnp.asarray(images))  # one compile of the network for every size
  ours = network(model, x)
  assert {k: v.shape for k, v in ours.items()} == {"pool3": (2, 2048), "spatial": (2, 2023), "logits": (2, 1008)}
  for name in ("pool3", "spatial", "logits"):
    err = rel_err(ours[name], theirs[name])
    assert err < TOL, f"{name} at {height}x{width}: relative error {err:.2e}"


def test_call_preprocesses():
  """preprocess takes uint8 and float [0, 255] alike; model(images) traces to the three outputs; bad input is a
  one-line error."""
  images = ref.random_images(1, 80, 96, seed=7)
  a = inception.preprocess(jnp.asarray(images))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(inception.preprocess(jnp.asarray(images, jnp.float32))))
  assert a.shape == (1, 299, 299, 3) and float(a.min()) >= -1 and float(a.max()) <= 127 / 128
  graphdef, state = nnx.split(nnx.eval_shape(lambda: inception.InceptionV3(rngs=nnx.Rngs(0))))
  out = jax.eval_shape(lambda s, im: nnx.merge(graphdef, s)(im), state, jax.ShapeDtypeStruct((3, 40, 50, 3), jnp.uint8))
  assert {k: v.shape for k, v in out.items()} == {"pool3": (3, 2048), "spatial": (3, 2023), "logits": (3, 1008)}
  for bad, match in (((1, 3, 64, 64), "NHWC"), ((1, 64, 64, 3), "dtype int32")):
    with pytest.raises(ValueError, match=match):
      inception.preprocess(jnp.zeros(bad, jnp.int32 if match.startswith("dtype") else jnp.uint8))


def test_matches_pytorch_fid(tmp_path, network):
  path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  state = ref.pytorch_fid_file(path)
  theirs_model = ref.pytorch_fid_model(path)
  import dit_jax
  from dit_jax import checkpoint
  from dit_jax.convert.files import convert

  convert(path, tmp_path / "ckpt")  # auto-detected, strict; the file's sha256 in the metadata
  sha = checkpoint.read_meta(tmp_path / "ckpt")["source"]["sha256"]
  assert sha == inception_tables.file_sha256(path) and len(sha) == 64
  model = dit_jax.load(tmp_path / "ckpt")
  x = (ref.random_images(2, 299, 299, seed=3).astype(np.float32) - 128) / 128
  with torch.no_grad():
    pool3 = theirs_model(torch.from_numpy(x).permute(0, 3, 1, 2))[0].reshape(2, -1).numpy()
  logits = pool3 @ state["fc.weight"].numpy().T.astype(np.float64)
  ours = network(model, jnp.asarray(x))
  for name, theirs in (("pool3", pool3), ("logits", logits)):
    err = rel_err(ours[name], theirs)
    assert err < TOL, f"{name} vs pytorch-fid: relative error {err:.2e}"
  back = inception_tables.from_model(model, "torch")
  assert set(back) == {k for k in state if not k.endswith("num_batches_tracked")}
  assert all(np.array_equal(back[k], state[k].numpy()) for k in back), "export is not the exact inverse"


@pytest.mark.parametrize("height,width", [(64, 64), (512, 384), (17, 1000)])
def test_resize_matches_tf1(height, width):
  _, interp = ref.torch_fidelity_modules()
  images = ref.random_images(2, height, width, seed=5)
  theirs = interp.interpolate_bilinear_2d_like_tensorflow1x(
      torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=(299, 299), align_corners=False)
  ours = inception.tf1_resize(jnp.asarray(images), (299, 299))
  err = rel_err(ours, theirs.permute(0, 2, 3, 1).numpy())
  assert err < 1e-5, f"TF1 resize {height}x{width}: relative error {err:.2e}"


def _tiny_state() -> dict[str, np.ndarray]:
  """Zero-valued tensors of the right shapes (from our own export) plus BN counters, as a torch file has them."""
  model = nnx.eval_shape(lambda: inception.InceptionV3(rngs=nnx.Rngs(0)))
  rules = inception_tables.torch_table(model.config)
  graph_state = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model))}
  out = {}
  for rule in rules:
    shape = inception_tables.engine.source_shapes(rule, graph_state[rule.target].shape, model.config,
                                                  inception_tables.OPS)[0]
    out[rule.sources[0]] = np.zeros(shape, np.float32)
  out["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.zeros((), np.int64)
  return out


def test_strict_errors():
  tensors = _tiny_state()
  layout = inception_tables.detect_layout(tensors)
  cfg = inception_tables.infer_config(tensors, layout)
  assert cfg.num_classes == 1008

  missing = dict(tensors)
  del missing["Mixed_6d.branch1x1.bn.running_var"]
  with pytest.raises(ConversionError, match=r"missing keys: Mixed_6d\.branch1x1\.bn\.running_var") as e:
    inception_tables.to_model(missing, cfg, layout)
  assert "\n" not in str(e.value)

  wrong = dict(tensors, **{"Mixed_5b.branch5x5_2.conv.weight": np.zeros((64, 48, 3, 3), np.float32)})
  with pytest.raises(ConversionError, match=r"wrong shape: Mixed_5b\.branch5x5_2\.conv\.weight \(64, 48, 3, 3\), "
                                            r"expected \(64, 48, 5, 5\)") as e:
    inception_tables.to_model(wrong, cfg, layout)
  assert "\n" not in str(e.value)

  with pytest.raises(ConversionError, match="unexpected keys: AuxLogits.fc.weight"):
    inception_tables.to_model(dict(tensors, **{"AuxLogits.fc.weight": np.zeros((2, 2), np.float32)}), cfg, layout)
  with pytest.raises(ConversionError, match="not an FID Inception-v3 state dict"):
    inception_tables.detect_layout({"encoder.conv_in.weight": np.zeros(1)})


def test_checkpoint_round_trip(tmp_path):
  """The 'inception' kind saves and loads through dit_jax.checkpoint like the other kinds."""
  from dit_jax import checkpoint
  cfg = inception.InceptionConfig(num_classes=10)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: inception.InceptionV3(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)  # random values without eager per-shape init (slow on CPU)
  model = nnx.merge(graphdef, jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32)), state))
  checkpoint.save(model, tmp_path / "ckpt", extra={"source": {"sha256": "0" * 64}})
  loaded = checkpoint.load(tmp_path / "ckpt")
  assert isinstance(loaded, inception.InceptionV3) and loaded.config == model.config
  assert checkpoint.read_meta(tmp_path / "ckpt")["kind"] == "inception"
  a, b = nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(loaded))
  assert all(np.array_equal(np.asarray(x[...]), np.asarray(y[...])) for (_, x), (_, y) in zip(a, b))
