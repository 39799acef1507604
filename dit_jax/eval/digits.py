"""The digits demo's evaluator: class accuracy and a Fréchet distance on scikit-learn's real 8x8 digits.

    clf, acc = digits_classifier()                  # RBF SVM on pixels in [0, 16]; acc: held-out accuracy
    clf.predict(to_digit_features(images))          # images (N, 8, 8, 1) in [-1, 1]
    fd = digits_frechet_distance(images)            # against the 450 held-out real digits
    floor = real_frechet_distance(len(images))      # as many real training digits, same measure

The split is ``load_digits`` in 1347 train / 450 held-out digits (stratified, ``random_state=seed``). The
Fréchet distance is the small-scale FID: features are the hidden layer (64 tanh units, the analogue of Inception's
pool3) of a one-hidden-layer MLP classifier trained on the same train split, and the distance is
:func:`dit_jax.eval.metrics.frechet_distance` (float64, ``scipy.linalg.sqrtm``, as ADM) between their statistics. The
MLP trains with one BLAS thread (deterministic, ~2 s on a CPU core) and is cached per seed, as are the held-out
statistics. The floor of the distance is not 0 at a finite sample size: :func:`real_frechet_distance` gives the
distance of real digits the generated ones are compared with.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import numpy as np

from dit_jax.eval.metrics import FeatureStats, frechet_distance

HIDDEN = 64  # feature width
MAX_ITER = 200  # Adam epochs of the feature network (not converged to tol 1e-4 by then: the warning is silenced)


@functools.lru_cache(maxsize=4)
def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(x_train (1347, 64), x_test (450, 64), y_train, y_test): the real digits, pixels in [0, 16] (float64)."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  parts = train_test_split(digits.data, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)
  for a in parts:
    a.flags.writeable = False  # cached: shared by every caller
  return tuple(parts)


def digits_classifier(seed: int = 0):
  """(classifier, held-out accuracy) on the real digits, features = pixels in [0, 16]."""
  from sklearn.svm import SVC

  x_train, x_test, y_train, y_test = digits_split(seed)
  clf = SVC(gamma=0.001, C=10.0).fit(x_train, y_train)
  return clf, float(clf.score(x_test, y_test))


def to_digit_features(images: np.ndarray) -> np.ndarray:
  """Generated images in [-1, 1], (N, 8, 8, 1) -> the classifier's pixel scale [0, 16], (N, 64)."""
  return np.clip((np.asarray(images, np.float64).reshape(len(images), -1) + 1.0) * 8.0, 0.0, 16.0)


@dataclasses.dataclass(frozen=True)
class FeatureNetwork:
  """A trained MLP as numpy arrays: h = tanh(x / 16 @ w1 + b1) (N, 64) are the features, h @ w2 + b2 the logits."""

  w1: np.ndarray  # (64, HIDDEN)
  b1: np.ndarray  # (HIDDEN,)
  w2: np.ndarray  # (HIDDEN, 10)
  b2: np.ndarray  # (10,)
  accuracy: float  # scikit-learn's held-out accuracy of the MLP

  def features(self, pixels: np.ndarray) -> np.ndarray:
    """(N, 64) pixels in [0, 16] -> (N, HIDDEN) float64 hidden activations."""
    return np.tanh(np.asarray(pixels, np.float64) / 16.0 @ self.w1 + self.b1)

  def logits(self, pixels: np.ndarray) -> np.ndarray:
    return self.features(pixels) @ self.w2 + self.b2


@functools.lru_cache(maxsize=4)
def feature_network(seed: int = 0) -> FeatureNetwork:
  """The MLP (64 tanh units, Adam, ``random_state=seed``) trained on the train split of :func:`digits_split`."""
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.neural_network import MLPClassifier
  from threadpoolctl import threadpool_limits

  x_train, x_test, y_train, y_test = digits_split(seed)
  mlp = MLPClassifier(hidden_layer_sizes=(HIDDEN,), activation="tanh", max_iter=MAX_ITER, random_state=seed)
  with threadpool_limits(1), warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    mlp.fit(x_train / 16.0, y_train)
  (w1, w2), (b1, b2) = mlp.coefs_, mlp.intercepts_
  return FeatureNetwork(w1, b1, w2, b2, float(mlp.score(x_test / 16.0, y_test)))


def digits_features(images: np.ndarray, seed: int = 0) -> np.ndarray:
  """Images (N, 8, 8, 1) in [-1, 1] -> the feature network's (N, 64) float64 hidden activations."""
  shape = np.shape(images)
  if len(shape) != 4 or shape[1:] != (8, 8, 1):
    raise ValueError(f"digits features need images of shape (N, 8, 8, 1) in [-1, 1], got {shape}")
  return feature_network(seed).features(to_digit_features(images))


@functools.lru_cache(maxsize=4)
def held_out_stats(seed: int = 0) -> FeatureStats:
  """Feature statistics of the 450 held-out real digits."""
  return FeatureStats.of(feature_network(seed).features(digits_split(seed)[1]))


def digits_frechet_distance(images: np.ndarray, seed: int = 0) -> float:
  """Fréchet distance between the features of ``images`` (N >= 2, 8, 8, 1) in [-1, 1] and the held-out digits'."""
  return frechet_distance(FeatureStats.of(digits_features(images, seed)), held_out_stats(seed))


def real_images(n: int, seed: int = 0) -> np.ndarray:
  """``n`` real training digits (without replacement, at most the 1347 there are; fixed order for ``seed``) as
  images (n, 8, 8, 1) in [-1, 1]."""
  x_train = digits_split(seed)[0]
  if n < 2:
    raise ValueError(f"need at least 2 real digits, got {n}")
  pick = np.random.default_rng(seed).choice(len(x_train), min(n, len(x_train)), replace=False)
  return (x_train[pick] / 8.0 - 1.0).reshape(-1, 8, 8, 1)


def real_frechet_distance(n: int, seed: int = 0) -> float:
  """The distance's floor at ``n`` samples: :func:`digits_frechet_distance` of ``n`` real training digits."""
  return digits_frechet_distance(real_images(n, seed), seed)
