"""tools/evaluate.py end to end on a random-weight Inception: a reference batch made with --make-reference from an
image folder, a sample.py-style npz and its shard folder; ADM's printed lines, the JSON, the resumable feature
cache, and one-line errors."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import dit_jax
from dit_jax.eval import evaluator, metrics
from dit_jax.eval.inception import InceptionV3
from dit_jax.eval.metrics import FeatureStats
from tests.helpers.processes import main_in_process

# A full-size Inception on CPU plus scipy's sqrtm at 2048 / 2023 dimensions per FID: minutes; outside CI for now.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A saved random Inception (He-scaled convolutions, identity batch norms), an ImageFolder of 12 images and a
  sample batch of 10 images (also as two shards)."""
  tmp = tmp_path_factory.mktemp("evaluate")
  graphdef, state = nnx.split(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)

  def value(path, leaf):
    names = {str(getattr(p, "key", getattr(p, "name", p))) for p in path}
    if names & {"scale", "var"}:
      return jnp.ones(leaf.shape, leaf.dtype)
    if leaf.ndim < 2:
      return jnp.zeros(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) * np.sqrt(2.0 / fan_in))

  model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(value, state))
  dit_jax.save(model, tmp / "inception")
  for i in range(12):
    folder = tmp / "images" / f"class{i % 2}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), np.uint8)).save(folder / f"{i}.png")
  samples = rng.integers(0, 256, (10, 32, 32, 3), np.uint8)
  np.savez(tmp / "samples.npz", arr_0=samples, latents=np.zeros((10, 4, 4, 4), np.float32))
  (tmp / "shards").mkdir()
  np.savez(tmp / "shards" / "000000.npz", arr_0=samples[:6])
  np.savez(tmp / "shards" / "000001.npz", arr_0=samples[6:])
  return tmp, samples


def test_make_reference_then_evaluate(setup, capsys):
  tmp, samples = setup
  inception = ["--inception", tmp / "inception", "--batch-size", "4"]
  code, err = main_in_process("tools/evaluate.py", ["--make-reference", tmp / "images", tmp / "ref.npz",
                                                    "--image-size", "32", *inception], capsys)
  assert code == 0, err
  ref = evaluator.ReferenceBatch.load(tmp / "ref.npz")
  assert ref.images.shape == (12, 32, 32, 3) and ref.pool3.mu.shape == (2048,) and ref.spatial.sigma.shape == (2023,
                                                                                                                 2023)
  code, err = main_in_process("tools/evaluate.py", [tmp / "ref.npz", tmp / "samples.npz", *inception], capsys)
  assert code == 0, err
  numbers = json.loads((tmp / "samples.npz.metrics.json").read_text())
  # the same numbers from the library, step by step
  model = dit_jax.load(tmp / "inception")
  ref_feats, sample_feats = evaluator.extract(model, ref.images, 4), evaluator.extract(model, samples, 4)
  precision, recall = metrics.precision_recall(ref_feats["pool3"], sample_feats["pool3"])
  want = {"inception_score": metrics.inception_score(sample_feats["logits"]),
          "fid": metrics.frechet_distance(FeatureStats.of(sample_feats["pool3"]), ref.pool3),
          "sfid": metrics.frechet_distance(FeatureStats.of(sample_feats["spatial"]), ref.spatial),
          "precision": precision, "recall": recall}
  for key, value in want.items():
    assert numbers[key] == pytest.approx(value, rel=1e-6), (key, numbers[key], value)
  assert numbers["fid"] > 0 and numbers["num_samples"] == 10 and numbers["num_reference_images"] == 12
  assert (tmp / "samples.npz.inception.npz").is_file()  # the resumable feature cache
  # the shard folder gives the same images, hence the same numbers; the cached run reads the cache
  code, err = main_in_process("tools/evaluate.py", [tmp / "ref.npz", tmp / "shards", *inception, "--json",
                                                    tmp / "shards.json"], capsys)
  assert code == 0, err
  assert json.loads((tmp / "shards.json").read_text()) == numbers


def test_prints_adm_lines(setup, capsys):
  tmp, _ = setup
  np.savez(tmp / "ref_plain.npz", arr_0=np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), np.uint8))
  import importlib.util

  from tests.helpers import REPO_ROOT
  spec = importlib.util.spec_from_file_location("_evaluate_cli", REPO_ROOT / "tools" / "evaluate.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.main([str(tmp / "ref_plain.npz"), str(tmp / "samples.npz"), "--inception", str(tmp / "inception"),
                      "--no-cache", "--json", str(tmp / "plain.json")]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert [line.split(":")[0] for line in lines] == ["Computing evaluations...", "Inception Score", "FID", "sFID",
                                                   "Precision", "Recall"], lines


@pytest.mark.parametrize("case,fragment", [
    ("no_inception", "no Inception checkpoint: convert pytorch-fid's pt_inception"),
    ("not_inception", "is not an Inception checkpoint"),
    ("no_arr_0", "has no arr_0"),
    ("missing", "sample batch"),
    ("half_stats", "has mu but not all of mu, sigma, mu_s, sigma_s"),
])
def test_bad_input_is_one_line(setup, tmp_path, capsys, monkeypatch, case, fragment):
  tmp, samples = setup
  monkeypatch.delenv("DIT_JAX_INCEPTION", raising=False)
  ref, sample, inception = tmp / "samples.npz", tmp / "samples.npz", ["--inception", tmp / "inception"]
  if case == "no_inception":
    inception = []
  elif case == "not_inception":
    (tmp_path / "dir").mkdir()
    inception = ["--inception", tmp_path / "dir"]
  elif case == "no_arr_0":
    np.savez(tmp_path / "bad.npz", images=samples)
    sample = tmp_path / "bad.npz"
  elif case == "missing":
    sample = tmp_path / "nope.npz"
  else:
    np.savez(tmp_path / "ref.npz", arr_0=samples, mu=np.zeros(2048))
    ref = tmp_path / "ref.npz"
  code, err = main_in_process("tools/evaluate.py", [ref, sample, *inception], capsys)
  assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
