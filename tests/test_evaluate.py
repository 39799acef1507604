"""tools/evaluate.py end to end on a random-weight Inception (75 px input, the minimum, so the sFID features are
3 x 3 x 7 and cheap; pool3 keeps its 2048): a reference batch made with --make-reference from an image folder, a
sample.py-style npz and its shard folder; ADM's printed lines, the JSON against an independent computation, the
resumable feature cache, and one-line errors. Each 2048-dimensional FID is a scipy sqrtm of about a minute on two
cores: CI runs one; the shard-folder and plain-reference runs are slow tests."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import dit_jax
from dit_jax.eval import evaluator, metrics
from dit_jax.eval.metrics import FeatureStats
from tests.helpers.inception_reference import frechet_by_eigh, random_inception
from tests.helpers.processes import main_in_process


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A saved random Inception, an ImageFolder of 12 images and a sample batch of 10 images (also as two shards)."""
  tmp = tmp_path_factory.mktemp("evaluate")
  rng = np.random.default_rng(0)
  dit_jax.save(random_inception(image_size=75), tmp / "inception")
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
  assert ref.images.shape == (12, 32, 32, 3) and ref.pool3.mu.shape == (2048,) and ref.spatial.sigma.shape == (63, 63)
  printed = []
  code, err = main_in_process("tools/evaluate.py", [tmp / "ref.npz", tmp / "samples.npz", *inception], capsys,
                              stdout=printed)
  assert code == 0, err
  assert [line.split(":")[0] for line in printed] == ["Computing evaluations...", "Inception Score", "FID", "sFID",
                                                     "Precision", "Recall"], printed
  numbers = json.loads((tmp / "samples.npz.metrics.json").read_text())
  assert printed[2] == f"FID: {numbers['fid']}", printed
  # the same numbers from the library's features; the Fréchet distances by eigh, independent of sqrtm
  model = dit_jax.load(tmp / "inception")
  ref_feats, sample_feats = evaluator.extract(model, ref.images, 4), evaluator.extract(model, samples, 4)
  assert np.allclose(FeatureStats.of(ref_feats["pool3"]).sigma, ref.pool3.sigma, rtol=0, atol=1e-12)
  precision, recall = metrics.precision_recall(ref_feats["pool3"], sample_feats["pool3"])
  want = {"inception_score": metrics.inception_score(sample_feats["logits"]),
          "fid": frechet_by_eigh(FeatureStats.of(sample_feats["pool3"]), ref.pool3),
          "sfid": frechet_by_eigh(FeatureStats.of(sample_feats["spatial"]), ref.spatial),
          "precision": precision, "recall": recall}
  for key, value in want.items():
    err = abs(numbers[key] - value) / max(abs(value), 1e-12)
    assert err <= 1e-6, f"{key}: tools/evaluate.py {numbers[key]} vs {value}, relative error {err:.2e}"
  assert numbers["fid"] > 0 and numbers["num_samples"] == 10 and numbers["num_reference_images"] == 12
  assert (tmp / "samples.npz.inception.npz").is_file()  # the resumable feature cache


@pytest.mark.slow
def test_shard_folder_and_plain_reference(setup, capsys):
  """The shard folder gives the same images, hence the same numbers; a reference batch without statistics uses
  its images' (a sqrtm each: slow)."""
  tmp, samples = setup
  inception = ["--inception", tmp / "inception", "--batch-size", "4"]
  if not (tmp / "samples.npz.metrics.json").is_file():
    assert main_in_process("tools/evaluate.py", ["--make-reference", tmp / "images", tmp / "ref.npz",
                                                 "--image-size", "32", *inception], capsys)[0] == 0
    assert main_in_process("tools/evaluate.py", [tmp / "ref.npz", tmp / "samples.npz", *inception], capsys)[0] == 0
  numbers = json.loads((tmp / "samples.npz.metrics.json").read_text())
  code, err = main_in_process("tools/evaluate.py", [tmp / "ref.npz", tmp / "shards", *inception, "--json",
                                                    tmp / "shards.json"], capsys)
  assert code == 0, err
  assert json.loads((tmp / "shards.json").read_text()) == numbers
  ref = evaluator.ReferenceBatch.load(tmp / "ref.npz")
  np.savez(tmp / "ref_plain.npz", arr_0=ref.images)  # no mu / sigma: computed from the images, the same numbers
  code, err = main_in_process("tools/evaluate.py", [tmp / "ref_plain.npz", tmp / "samples.npz", *inception,
                                                    "--no-cache", "--json", tmp / "plain.json"], capsys)
  assert code == 0, err
  plain = json.loads((tmp / "plain.json").read_text())
  for key in ("fid", "sfid", "inception_score", "precision", "recall"):
    assert plain[key] == pytest.approx(numbers[key], rel=1e-9), (key, plain[key], numbers[key])


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
