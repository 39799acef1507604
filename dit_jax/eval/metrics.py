"""The ADM evaluator's metrics (openai/guided-diffusion ``evaluations/evaluator.py``) on Inception features.

    stats = FeatureStats.of(pool3)                  # mu (D,), sigma (D, D), float64
    fid = frechet_distance(ref, sample)             # FID on pool3, sFID on the 2023 spatial features
    inception_score(logits)                         # splits of 5000 in file order
    precision, recall = precision_recall(ref_pool3, sample_pool3)

As ADM computes them: FID with ``scipy.linalg.sqrtm`` of sigma1 sigma2, retried with 1e-6 I added to both
covariances when the root is not finite, and refused when its diagonal has an imaginary part above 1e-3; IS as
exp(mean KL(p(y|x) || p(y))) per split, averaged over splits; precision / recall with the k = 3 manifold (radius:
the 4th-smallest squared distance, the point itself included), membership ``<=``, blocks of 10,000, distances in
float16 unless a block overflows (then float32). :func:`frechet_distance_on_device` is an eigh-based Fréchet
distance for the training loop (float32 on the devices; no host round trip of the covariances), and
:func:`frechet_distance_of_features_on_device` its form from the features themselves, exact also when there are
fewer samples than dimensions.
"""
from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

IS_SPLIT = 5000  # ADM's split_size: consecutive, not shuffled
PR_BLOCK = 10_000  # ADM's row / column batch sizes
PR_K = 3  # nhood_sizes=(3,)
FID_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class FeatureStats:
  """Mean (D,) and covariance (D, D) of a feature set, float64 (ADM reference batches: mu / sigma, mu_s / sigma_s)."""

  mu: np.ndarray
  sigma: np.ndarray

  @classmethod
  def of(cls, features: np.ndarray) -> FeatureStats:
    """(N, D) features -> their mean and unbiased covariance (``np.cov(rowvar=False)``), computed in float64."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) < 2:
      raise ValueError(f"feature statistics need (N >= 2, D) features, got shape {x.shape}")
    return cls(x.mean(axis=0), np.cov(x, rowvar=False))


def frechet_distance(a: FeatureStats, b: FeatureStats, eps: float = FID_EPS) -> float:
  """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr sqrt(S_a S_b), as ADM (from TTUR)."""
  mu1, mu2 = np.atleast_1d(a.mu), np.atleast_1d(b.mu)
  s1, s2 = np.atleast_2d(a.sigma), np.atleast_2d(b.sigma)
  if mu1.shape != mu2.shape or s1.shape != s2.shape:
    raise ValueError(f"statistics of different widths: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
  diff = mu1 - mu2
  covmean = linalg.sqrtm(s1.dot(s2))
  if not np.isfinite(covmean).all():
    warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
    offset = np.eye(s1.shape[0]) * eps
    covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"the Fréchet distance's matrix square root has an imaginary component "
                       f"{np.max(np.abs(covmean.imag)):.3g}")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def frechet_distance_on_device(mu1: jax.Array, sigma1: jax.Array, mu2: jax.Array, sigma2: jax.Array) -> jax.Array:
  """The Fréchet distance with tr sqrt(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))), symmetric eigh only (float32,
  precision highest; jittable, runs where its inputs are). Negative eigenvalues from rounding are clipped to 0."""
  hi = jax.lax.Precision.HIGHEST
  w, v = jnp.linalg.eigh(sigma1)
  root1 = jnp.matmul(v * jnp.sqrt(jnp.clip(w, 0)), v.T, precision=hi)
  m = jnp.matmul(jnp.matmul(root1, sigma2, precision=hi), root1, precision=hi)
  tr_covmean = jnp.sum(jnp.sqrt(jnp.clip(jnp.linalg.eigvalsh((m + m.T) / 2), 0)))
  diff = mu1 - mu2
  return jnp.dot(diff, diff, precision=hi) + jnp.trace(sigma1) + jnp.trace(sigma2) - 2 * tr_covmean


def frechet_distance_of_features_on_device(x: jax.Array, mu2: jax.Array, sigma2: jax.Array) -> jax.Array:
  """The Fréchet distance between features ``x`` (N, D) and (mu2, sigma2), float32 on the devices (jittable).

  With N <= D the features' covariance S1 = Xc^T Xc / (N - 1) has rank < N, and the eigenvalues of
  sqrt(S1) S2 sqrt(S1) are mostly rounding noise whose square roots add up; so tr sqrt(S1 S2) is taken from the
  N x N matrix Xc S2 Xc^T / (N - 1), whose eigenvalues are exactly the nonzero ones of S1 S2. N > D: the (D, D)
  covariance and :func:`frechet_distance_on_device`.
  """
  hi = jax.lax.Precision.HIGHEST
  n, d = x.shape
  mu1 = x.mean(axis=0)
  xc = x - mu1
  if n > d:
    return frechet_distance_on_device(mu1, jnp.matmul(xc.T, xc, precision=hi) / (n - 1), mu2, sigma2)
  a = jnp.matmul(jnp.matmul(xc, sigma2, precision=hi), xc.T, precision=hi) / (n - 1)
  tr_covmean = jnp.sum(jnp.sqrt(jnp.clip(jnp.linalg.eigvalsh((a + a.T) / 2), 0)))
  diff = mu1 - mu2
  return jnp.dot(diff, diff, precision=hi) + jnp.sum(xc * xc) / (n - 1) + jnp.trace(sigma2) - 2 * tr_covmean


def _softmax(logits: np.ndarray) -> np.ndarray:
  z = np.asarray(logits, np.float32)
  e = np.exp(z - z.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT) -> float:
  """exp(mean_x KL(p(y|x) || p(y))) per consecutive split of ``split_size``, averaged over the splits (ADM returns
  the mean only). ``logits``: (N, 1008) pool3 @ W without bias; softmax in float32."""
  preds = _softmax(logits)
  scores = []
  for i in range(0, len(preds), split_size):
    part = preds[i:i + split_size]
    kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return float(np.mean(scores))


def _distances(u: np.ndarray, v: np.ndarray, dtype) -> np.ndarray:
  """max(|u|^2 - 2 u v^T + |v|^2, 0) with every operand and result rounded to ``dtype``; sums (of the rounded
  squares, of the matmul's products) run in float32, as float16 reductions and matmuls on an accelerator do."""
  u, v = np.asarray(u, np.float32).astype(dtype), np.asarray(v, np.float32).astype(dtype)
  nu = np.square(u).astype(np.float32).sum(1).astype(dtype)[:, None]
  nv = np.square(v).astype(np.float32).sum(1).astype(dtype)[None, :]
  uv = (u.astype(np.float32) @ v.astype(np.float32).T).astype(dtype)
  two_uv = (np.asarray(2, dtype) * uv).astype(dtype)
  return np.maximum(((nu - two_uv).astype(dtype) + nv).astype(dtype), np.asarray(0, dtype))


def pairwise_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Squared distances (len(u), len(v)) in float16, or in float32 when any float16 value is not finite; float32."""
  with np.errstate(over="ignore", invalid="ignore"):
    d = _distances(u, v, np.float16)
  return d.astype(np.float32) if np.isfinite(d).all() else _distances(u, v, np.float32)


def manifold_radii(features: np.ndarray, k: int = PR_K, block: int = PR_BLOCK) -> np.ndarray:
  """(N,) the k-th nearest neighbour's squared distance, the point itself counted (index k of the sorted row)."""
  n = len(features)
  radii = np.zeros(n, np.float32)
  for begin in range(0, n, block):
    rows = features[begin:begin + block]
    dist = np.concatenate([pairwise_distances(rows, features[c:c + block]) for c in range(0, n, block)], axis=1)
    radii[begin:begin + block] = np.partition(dist, k, axis=1)[:, k]
  return radii


def precision_recall(ref: np.ndarray, sample: np.ndarray, k: int = PR_K, block: int = PR_BLOCK
                     ) -> tuple[float, float]:
  """Precision: the fraction of samples inside some reference ball; recall: the fraction of reference points
  inside some sample ball (balls: :func:`manifold_radii`, membership ``<=``)."""
  ref, sample = np.asarray(ref, np.float32), np.asarray(sample, np.float32)
  r_ref, r_sample = manifold_radii(ref, k, block), manifold_radii(sample, k, block)
  ref_in = np.zeros(len(ref), bool)  # inside some sample ball -> recall
  sample_in = np.zeros(len(sample), bool)  # inside some reference ball -> precision
  for i in range(0, len(ref), block):
    for j in range(0, len(sample), block):
      d = pairwise_distances(ref[i:i + block], sample[j:j + block])
      ref_in[i:i + block] |= (d <= r_sample[None, j:j + block]).any(axis=1)
      sample_in[j:j + block] |= (d <= r_ref[i:i + block, None]).any(axis=0)
  return float(sample_in.mean()), float(ref_in.mean())
