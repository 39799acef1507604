"""The digits demo's Fréchet distance (dit_jax.eval.digits): its zero, its floor and ordering, a direct numpy / scipy
transcription, determinism, and the features being the MLP classifier's own hidden layer."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from dit_jax.eval import digits
from tests.helpers.processes import run_cli

N = 500  # demo_quality's default: 50 per class


def _images(pixels: np.ndarray) -> np.ndarray:
  return (np.asarray(pixels) / 8.0 - 1.0).reshape(-1, 8, 8, 1)


@pytest.fixture(scope="module")
def held_out():
  return _images(digits.digits_split(0)[1])


@pytest.fixture(scope="module")
def scores():
  """FD against the held-out digits of: real training digits, uniform noise, a constant grey image, the mean digit
  plus small noise, and real digits corrupted with Gaussian pixel noise of growing std (in [-1, 1] units)."""
  rng = np.random.default_rng(1)
  real = digits.real_images(N)
  mean = _images(digits.digits_split(0)[0].mean(0)) + rng.normal(0, 0.05, (N, 8, 8, 1))
  out = {"real": digits.real_frechet_distance(N), "mean": digits.digits_frechet_distance(mean),
         "noise": digits.digits_frechet_distance(rng.uniform(-1, 1, real.shape))}
  constant = np.zeros_like(real) + rng.normal(0, 1e-3, real.shape)  # grey; the jitter keeps the covariance full rank
  out["constant"] = digits.digits_frechet_distance(constant)
  for std in (0.125, 0.25, 0.5, 1.0):
    out[std] = digits.digits_frechet_distance(np.clip(real + rng.normal(0, std, real.shape), -1, 1))
  return out


def test_held_out_against_itself_is_zero(held_out):
  fd = digits.digits_frechet_distance(held_out)
  assert len(held_out) == 450 and abs(fd) <= 1e-6, f"FD of the held-out digits with themselves: {fd:.3g}"


def test_real_digits_score_low_and_far_below_noise(scores):
  print({k: round(v, 4) for k, v in scores.items()})
  assert 0 < scores["real"] < 1.0, scores
  for bad in ("noise", "constant", "mean"):
    assert scores[bad] > 20 * scores["real"], (bad, scores)
  corrupted = [scores["real"]] + [scores[s] for s in (0.125, 0.25, 0.5, 1.0)]
  assert corrupted == sorted(corrupted), f"FD should grow with pixel noise: {corrupted}"


def test_equals_direct_transcription():
  images = digits.real_images(N)
  a = digits.digits_features(images)
  b = digits.feature_network(0).features(digits.digits_split(0)[1])
  mu1, mu2 = a.mean(0), b.mean(0)
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root = linalg.sqrtm(s1 @ s2).real
  want = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))
  got = digits.digits_frechet_distance(images)
  assert abs(got - want) <= 1e-9 * abs(want), f"{got!r} vs {want!r}: {abs(got - want) / abs(want):.2e} relative"


def test_features_are_the_classifiers_hidden_layer():
  """The numpy forward's argmax reproduces scikit-learn's held-out accuracy of the MLP (and it is a good one)."""
  net = digits.feature_network(0)
  x_test, y_test = digits.digits_split(0)[1], digits.digits_split(0)[3]
  accuracy = float((net.logits(x_test).argmax(1) == y_test).mean())
  assert accuracy == net.accuracy and accuracy >= 0.95, (accuracy, net.accuracy)
  assert digits.digits_features(_images(x_test)).shape == (450, digits.HIDDEN)


def test_deterministic():
  """Two calls agree exactly, and so does a network retrained from scratch (the cache cleared)."""
  images = digits.real_images(N)
  first = (digits.digits_frechet_distance(images), digits.real_frechet_distance(N))
  assert (digits.digits_frechet_distance(images), digits.real_frechet_distance(N)) == first
  digits.feature_network.cache_clear()
  digits.held_out_stats.cache_clear()
  assert (digits.digits_frechet_distance(images), digits.real_frechet_distance(N)) == first


def test_bad_inputs():
  with pytest.raises(ValueError, match=r"shape \(N, 8, 8, 1\).*\(5, 64\)"):
    digits.digits_features(np.zeros((5, 64)))
  with pytest.raises(ValueError, match="N >= 2"):
    digits.digits_frechet_distance(np.zeros((1, 8, 8, 1)))
  with pytest.raises(ValueError, match="at least 2"):
    digits.real_images(1)


def test_demo_quality_help():
  result = run_cli("tools/demo_quality.py", "--help", timeout=120)
  assert result.returncode == 0 and "Fréchet distance" in result.stdout, result.stderr[-2000:]
