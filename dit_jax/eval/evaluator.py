"""The ADM evaluator on dit_jax's Inception: reference / sample batches (``.npz``) -> IS, FID, sFID, precision,
recall (``tools/evaluate.py``).

    ref = ReferenceBatch.load("VIRTUAL_imagenet256_labeled.npz")   # arr_0 images (+ mu, sigma, mu_s, sigma_s)
    feats = extract(inception, images)                              # {'pool3', 'spatial', 'logits'} float32
    numbers = evaluate(inception, ref, sample_images)               # {'inception_score', 'fid', 'sfid', ...}

Features are extracted in fixed-size batches by one jitted function (the last batch padded, so one compile), and
can be cached to a ``.npz`` that a later run resumes from (50K images take a while on one device).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.eval import metrics
from dit_jax.eval.metrics import FeatureStats

FEATURES = ("pool3", "spatial", "logits")
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
INCEPTION_ENV = "DIT_JAX_INCEPTION"
HOW_TO_CONVERT = ("convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or torch-fidelity's "
                  "weights-inception-2015-12-05-6726825d.pth) with tools/convert_torch.py FILE DIR and pass "
                  f"its DIR (or set {INCEPTION_ENV})")


def load_inception(path: str | os.PathLike | None):
  """The converted FID Inception at ``path`` (default ``$DIT_JAX_INCEPTION``); one-line errors saying how to
  convert one."""
  from dit_jax.checkpoint import CheckpointError, load
  from dit_jax.eval.inception import InceptionV3

  path = path or os.environ.get(INCEPTION_ENV)
  if not path:
    raise ValueError(f"no Inception checkpoint: {HOW_TO_CONVERT}")
  if not pathlib.Path(path).is_dir():
    raise FileNotFoundError(f"Inception checkpoint {path} not found: {HOW_TO_CONVERT}")
  try:
    model = load(path)
  except CheckpointError as e:
    raise ValueError(f"{path} is not an Inception checkpoint ({str(e).splitlines()[0]}): {HOW_TO_CONVERT}") from None
  if not isinstance(model, InceptionV3):
    raise ValueError(f"{path} is not an Inception checkpoint ({type(model).__name__}): {HOW_TO_CONVERT}")
  return model


def read_images(path: str | os.PathLike, what: str) -> np.ndarray:
  """``arr_0`` of an ADM-format ``.npz`` (N, H, W, 3) uint8, or of every shard of a ``sample.py`` shard folder."""
  path = pathlib.Path(path)
  files = sorted(path.glob("*.npz")) if path.is_dir() else [path]
  if not path.exists():
    raise FileNotFoundError(f"{what} {path} not found")
  if not files:
    raise ValueError(f"{what} {path} is a folder without .npz shards")
  parts = []
  for f in files:
    try:
      with np.load(f, allow_pickle=False) as data:
        if "arr_0" not in data.files:
          raise ValueError(f"{what} {f.name} has no arr_0 (the images; keys: {', '.join(data.files) or 'none'})")
        parts.append(data["arr_0"])
    except (OSError, EOFError) as e:
      raise ValueError(f"{what} {f.name} is not a readable .npz ({str(e).splitlines()[0]})") from None
  images = np.concatenate(parts) if len(parts) > 1 else parts[0]
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) == 0:
    raise ValueError(f"{what} {path.name}: arr_0 must be (N, H, W, 3) uint8 images, got {images.shape} "
                     f"{images.dtype}")
  return images


def read_pool3_stats(path: str | os.PathLike) -> FeatureStats | None:
  """A reference batch's stored pool3 ``mu`` / ``sigma`` (float64) without reading its images; None when absent."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"reference batch {path} not found")
  try:
    with np.load(path, allow_pickle=False) as data:
      if not {"mu", "sigma"} <= set(data.files):
        return None
      stats = FeatureStats(np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64))
  except (OSError, EOFError, ValueError) as e:
    raise ValueError(f"reference batch {path.name} is not a readable .npz ({str(e).splitlines()[0]})") from None
  d = stats.mu.shape
  if stats.mu.ndim != 1 or stats.sigma.shape != d * 2:
    raise ValueError(f"reference batch {path.name}: mu {stats.mu.shape} and sigma {stats.sigma.shape} are not "
                     "(D,) and (D, D)")
  return stats


@dataclasses.dataclass
class ReferenceBatch:
  """An ADM reference batch: images (``arr_0``) and, when present, the dataset's pool3 / spatial statistics."""

  images: np.ndarray
  pool3: FeatureStats | None = None
  spatial: FeatureStats | None = None

  @classmethod
  def load(cls, path: str | os.PathLike) -> ReferenceBatch:
    images = read_images(path, "reference batch")
    with np.load(path, allow_pickle=False) as data:
      present = [k for k in STAT_KEYS if k in data.files]
      if present and len(present) != len(STAT_KEYS):
        raise ValueError(f"reference batch {pathlib.Path(path).name} has {', '.join(present)} but not all of "
                         f"{', '.join(STAT_KEYS)}")
      if not present:
        return cls(images)
      stats = {k: np.asarray(data[k], np.float64) for k in STAT_KEYS}
    return cls(images, FeatureStats(stats["mu"], stats["sigma"]), FeatureStats(stats["mu_s"], stats["sigma_s"]))

  def save(self, path: str | os.PathLike) -> None:
    """ADM's format: ``arr_0`` plus mu / sigma (pool3) and mu_s / sigma_s (spatial)."""
    from dit_jax.sample_files import save_npz

    save_npz(path, arr_0=self.images, mu=self.pool3.mu, sigma=self.pool3.sigma, mu_s=self.spatial.mu,
             sigma_s=self.spatial.sigma)


@nnx.jit
def _features(model, images: jax.Array) -> dict[str, jax.Array]:
  return model(images)


def extract(model, images: np.ndarray, batch_size: int = 64, cache: str | os.PathLike | None = None,
            progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
  """{'pool3' (N, 2048), 'spatial' (N, 2023), 'logits' (N, 1008)} float32 features of uint8 images (N, H, W, 3).

  ``cache``: a ``.npz`` holding the features of the first images; extraction resumes after them and rewrites it
  every few batches. ``progress(done, total)`` is called after each batch.
  """
  n = len(images)
  done: dict[str, list[np.ndarray]] = {k: [] for k in FEATURES}
  start = 0
  cache = pathlib.Path(cache) if cache is not None else None
  if cache is not None and cache.is_file():
    with np.load(cache, allow_pickle=False) as data:
      start = min(len(data["pool3"]), n)
      for k in FEATURES:
        done[k].append(data[k][:start])
  for i in range(start, n, batch_size):
    batch = images[i:i + batch_size]
    real = len(batch)
    if real < batch_size:  # pad: one compiled shape
      batch = np.concatenate([batch, np.zeros((batch_size - real, *batch.shape[1:]), batch.dtype)])
    out = jax.device_get(_features(model, jnp.asarray(batch)))
    for k in FEATURES:
      done[k].append(np.asarray(out[k][:real], np.float32))
    if cache is not None and ((i // batch_size) % 20 == 19 or i + batch_size >= n):
      _write_cache(cache, {k: np.concatenate(v) for k, v in done.items()})
    if progress is not None:
      progress(min(i + batch_size, n), n)
  return {k: np.concatenate(v) if v else np.zeros((0,), np.float32) for k, v in done.items()}


def _write_cache(path: pathlib.Path, features: dict[str, np.ndarray]) -> None:
  tmp = path.with_name(path.name + ".tmp.npz")
  np.savez(tmp, **features)
  tmp.replace(path)


def evaluate(model, ref: ReferenceBatch, sample_images: np.ndarray, *, batch_size: int = 64,
             sample_cache: str | os.PathLike | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
  """ADM's five numbers for ``sample_images`` against ``ref`` (its stored statistics when it has them, else
  those of its images; precision / recall always against its images' pool3)."""
  ref_feats = extract(model, ref.images, batch_size, progress=progress)
  sample = extract(model, sample_images, batch_size, cache=sample_cache, progress=progress)
  ref_pool3 = ref.pool3 or FeatureStats.of(ref_feats["pool3"])
  ref_spatial = ref.spatial or FeatureStats.of(ref_feats["spatial"])
  precision, recall = metrics.precision_recall(ref_feats["pool3"], sample["pool3"])
  return {"inception_score": metrics.inception_score(sample["logits"]),
          "fid": metrics.frechet_distance(FeatureStats.of(sample["pool3"]), ref_pool3),
          "sfid": metrics.frechet_distance(FeatureStats.of(sample["spatial"]), ref_spatial),
          "precision": precision, "recall": recall, "num_samples": int(len(sample_images)),
          "num_reference_images": int(len(ref.images))}


def reference_from_images(model, images: np.ndarray, batch_size: int = 64) -> ReferenceBatch:
  """A reference batch of ``images`` with their own pool3 / spatial statistics."""
  feats = extract(model, images, batch_size)
  return ReferenceBatch(images, FeatureStats.of(feats["pool3"]), FeatureStats.of(feats["spatial"]))
