"""The ADM evaluator's metrics against a direct numpy / scipy transcription of evaluations/evaluator.py (FID, sFID,
IS, precision / recall), analytic cases, and the on-device Fréchet distance against scipy at 2048 dimensions."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg

from dit_jax.eval import metrics
from dit_jax.eval.metrics import FeatureStats


def _features(n: int, d: int, seed: int, scale: float = 1.0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  mix = rng.standard_normal((d, d)) / np.sqrt(d)
  return (scale * (rng.standard_normal((n, d)) @ mix + rng.standard_normal(d))).astype(np.float32)


def _adm_fid(f1: np.ndarray, f2: np.ndarray) -> float:
  """evaluator.py's compute_statistics + frechet_distance (float64 statistics), written out."""
  mu1, mu2 = np.mean(f1.astype(np.float64), 0), np.mean(f2.astype(np.float64), 0)
  s1, s2 = np.cov(f1.astype(np.float64), rowvar=False), np.cov(f2.astype(np.float64), rowvar=False)
  covmean = linalg.sqrtm(s1.dot(s2))
  if not np.isfinite(covmean).all():
    offset = np.eye(s1.shape[0]) * 1e-6
    covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
  covmean = covmean.real
  diff = mu1 - mu2
  return diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


@pytest.mark.parametrize("n,d", [(600, 64), (50, 64)])  # full rank and rank-deficient covariances
def test_fid_matches_transcription_and_is_zero_on_itself(n, d):
  a, b = _features(n, d, 0), _features(n, d, 1)
  fid = metrics.frechet_distance(FeatureStats.of(a), FeatureStats.of(b))
  want = _adm_fid(a, b)
  err = abs(fid - want) / abs(want)
  assert err <= 1e-6, f"FID {fid} vs transcription {want}: {err:.2e}"
  same = metrics.frechet_distance(FeatureStats.of(a), FeatureStats.of(a))
  assert abs(same) <= 1e-6 * np.trace(FeatureStats.of(a).sigma), same


def test_fid_refuses_a_complex_root_and_mismatched_widths():
  s = FeatureStats(np.zeros(2), np.array([[1.0, 0.0], [0.0, 1.0]]))
  t = FeatureStats(np.zeros(2), -np.eye(2))  # sqrt(S1 S2) = i I: not a covariance
  with pytest.raises(ValueError, match="imaginary component"):
    metrics.frechet_distance(s, t)
  with pytest.raises(ValueError, match="different widths"):
    metrics.frechet_distance(s, FeatureStats(np.zeros(3), np.eye(3)))
  with pytest.raises(ValueError, match=r"\(N >= 2, D\)"):
    FeatureStats.of(np.zeros(5))


def test_inception_score_matches_transcription():
  """Consecutive splits of 5000 (the last one partial), float32 softmax of the unbiased logits."""
  logits = _features(12_000, 16, 2, scale=3.0)
  preds = np.exp(logits - logits.max(1, keepdims=True))
  preds /= preds.sum(1, keepdims=True)
  scores = []
  for i in range(0, len(preds), 5000):
    part = preds[i:i + 5000]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  got = metrics.inception_score(logits)
  assert got == pytest.approx(float(np.mean(scores)), rel=1e-6), (got, np.mean(scores))
  uniform = metrics.inception_score(np.zeros((10, 1008), np.float32))
  assert uniform == pytest.approx(1.0)


def _adm_distances(u, v, dtype):
  """DistanceBlock: max(|u|^2 - 2 u v^T + |v|^2, 0) with float16 tensors (float32 sums)."""
  u, v = u.astype(dtype), v.astype(dtype)
  nu = np.square(u).astype(np.float32).sum(1).astype(dtype).reshape(-1, 1)
  nv = np.square(v).astype(np.float32).sum(1).astype(dtype).reshape(1, -1)
  mm = (u.astype(np.float32) @ v.astype(np.float32).T).astype(dtype)
  return np.maximum((nu - (2 * mm).astype(dtype)).astype(dtype) + nv, 0).astype(dtype)


def _adm_precision_recall(ref, sample):
  """ManifoldEstimator (k = 3) on whole matrices: no blocks."""
  def dist(u, v):
    with np.errstate(over="ignore", invalid="ignore"):
      d = _adm_distances(u, v, np.float16)
    return d.astype(np.float32) if np.isfinite(d).all() else _adm_distances(u, v, np.float32).astype(np.float32)

  radii = lambda f: np.partition(dist(f, f), np.arange(4), axis=1)[:, 3]
  r_ref, r_sample = radii(ref), radii(sample)
  d = dist(ref, sample)
  precision = np.mean(np.any(d <= r_ref[:, None], axis=0))
  recall = np.mean(np.any(d <= r_sample[None, :], axis=1))
  return precision, recall


@pytest.mark.parametrize("scale", [1.0, 200.0])  # float16 distances; overflow -> the float32 fallback
def test_precision_recall_match_transcription_in_blocks(scale):
  ref, sample = _features(300, 32, 3, scale), _features(410, 32, 4, scale) * 1.3
  want = _adm_precision_recall(ref, sample)
  assert metrics.precision_recall(ref, sample, block=64) == want == metrics.precision_recall(ref, sample)
  if scale > 1:
    with np.errstate(over="ignore"):
      assert not np.isfinite(_adm_distances(ref, sample, np.float16)).all()  # the fallback did run


def test_precision_recall_orientation():
  """Samples: a copy of the reference set nudged by 0.01, and as many far away: precision 0.5 (the far half is in
  no reference ball), recall 1 (each reference point lies in its copy's ball); swapping the roles swaps them."""
  rng = np.random.default_rng(5)
  ref = rng.standard_normal((40, 8)).astype(np.float32)
  sample = np.concatenate([ref + 0.01, ref + 100.0]).astype(np.float32)
  assert metrics.precision_recall(ref, sample) == (0.5, 1.0)
  assert metrics.precision_recall(sample, ref) == (1.0, 0.5)


def test_on_device_frechet_distance_matches_scipy_at_2048_dims():
  a, b = _features(3000, 2048, 6), _features(3000, 2048, 7)
  sa, sb = FeatureStats.of(a), FeatureStats.of(b)
  want = metrics.frechet_distance(sa, sb)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  got = float(jax.jit(metrics.frechet_distance_on_device)(f32(sa.mu), f32(sa.sigma), f32(sb.mu), f32(sb.sigma)))
  err = abs(got - want) / abs(want)
  assert err <= 1e-3, f"on-device FD {got} vs scipy {want}: {err:.2e}"
  # the form from the features: the same (D, D) computation when N > D ...
  got = float(jax.jit(metrics.frechet_distance_of_features_on_device)(f32(a), f32(sb.mu), f32(sb.sigma)))
  err = abs(got - want) / abs(want)
  assert err <= 1e-3, f"on-device FD from 3000 features {got} vs scipy {want}: {err:.2e}"


@pytest.mark.parametrize("n", [12, 200])
def test_on_device_frechet_distance_with_fewer_samples_than_dims(n):
  """N <= D: the covariance is rank-deficient; the N x N form stays exact in float32 where the (D, D) eigh form
  sums the square roots of rounding noise."""
  a, b = _features(n, 256, 8), _features(400, 256, 9)
  sb = FeatureStats.of(b)
  want = metrics.frechet_distance(FeatureStats.of(a), sb)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  got = float(jax.jit(metrics.frechet_distance_of_features_on_device)(f32(a), f32(sb.mu), f32(sb.sigma)))
  err = abs(got - want) / abs(want)
  assert err <= 1e-5, f"on-device FD from {n} features {got} vs scipy {want}: {err:.2e}"
