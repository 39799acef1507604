"""Deterministic, resumable, multi-host batch loader over a random-access source.

Epoch e reads the source in the order ``perm_e = default_rng([seed, e]).permutation(N)`` (``arange(N)`` without
shuffling). Global batch b of the epoch is ``perm_e[b G:(b + 1) G]`` and host p takes its p-th contiguous slice of
G / P items, so the P hosts together read exactly the batch a single host reads. Item i is flipped in epoch e iff
``default_rng([seed, e, i]).random() < 0.5``: a function of (seed, epoch, index) only.

A corrupt item at position j of the permutation is replaced by the first readable item of perm_e[j + 1], perm_e[j
+ 2], ... (wrapping around). The replacement depends only on the position, so it is the same for any host count
and after a resume, and the batch stays full. Every corrupt item passed over counts in ``skipped``; each corrupt
index is logged once. A host raises when more than half of its share of an epoch is corrupt (counted since the
epoch started, or since the resume), or when more than N / 2 items in a row are.

State (``get_state`` / ``set_state``, JSON ints): epoch, position (items of the epoch already served to all hosts
together) and this host's skipped count. It covers the batches returned so far, not those decoded ahead. Positions
are in items, so a run may resume with another batch size or host count.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import threading

import numpy as np

from dit_jax.data.sources import CorruptImage, first_readable
from dit_jax.data.transforms import preprocess

logger = logging.getLogger("dit_jax")


class Loader:
  """Infinite iterator of {"image": float32 (L, S, S, C) in [-1, 1], "label": int32 (L,)}, L = G / P.

  Args:
    source: ``len(source)``, ``source[i] -> {"image": uint8 (H, W, C), "label": int}``; may raise CorruptImage.
      A source with ``extra_shapes`` ({name: shape}) also returns those arrays per item; they are batched as
      float32 under the same names (e.g. "context" (L, Dc), "pooled" (Dp,) for MMDiT conditioning).
      A source with ``transform(item, *, flip, seed, epoch, index) -> float32 item_shape`` and ``item_shape``
      makes its own inputs instead of ``preprocess`` (e.g. :class:`~dit_jax.data.latents.LatentSource`);
      image_size and channels are then unused.
    global_batch_size: G, summed over the P = process_count hosts; must be divisible by P.
    seed: fixes the order and the flips of every epoch.
    image_size: S; images go through the ADM centre crop (see ``transforms.preprocess``).
    shuffle, random_flip: as in DiT's train.py (both on).
    drop_remainder: drop the last partial global batch of an epoch; if False it is served, each host taking its
      contiguous share (sizes may differ by one between hosts).
    channels: 1 or 3 to force; 0 keeps the source's channel count (``source.channels``).
    num_workers: decoding threads (None: min(8, cpu count); 0: decode in the calling thread).
    prefetch: batches decoded ahead of the one being consumed.
  """

  def __init__(self, source, *, global_batch_size: int, seed: int, image_size: int, process_index: int = 0,
               process_count: int = 1, shuffle: bool = True, random_flip: bool = True, drop_remainder: bool = True,
               channels: int = 0, num_workers: int | None = None, prefetch: int = 2):
    n = len(source)
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if global_batch_size < 1 or global_batch_size % process_count:
      raise ValueError(f"global_batch_size {global_batch_size} is not a positive multiple of process_count "
                       f"{process_count}")
    if n < (global_batch_size if drop_remainder else 1):
      raise ValueError(f"the dataset has {n} items, fewer than global_batch_size {global_batch_size}")
    if channels not in (0, 1, 3):
      raise ValueError(f"channels must be 0 (as stored), 1 or 3, got {channels}")
    self.source, self.seed, self.image_size = source, int(seed), int(image_size)
    self.global_batch_size, self.process_index, self.process_count = global_batch_size, process_index, process_count
    self.local_batch_size = global_batch_size // process_count
    self.shuffle, self.random_flip, self.drop_remainder = shuffle, random_flip, drop_remainder
    self.channels = channels or getattr(source, "channels", None) or first_readable(source)["image"].shape[-1]
    self.num_items = n
    self._transform = getattr(source, "transform", None)
    self._shape = tuple(source.item_shape) if self._transform else None
    self._extra = dict(getattr(source, "extra_shapes", None) or {})
    self.steps_per_epoch = n // global_batch_size if drop_remainder else -(-n // global_batch_size)
    workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
    self._pool = concurrent.futures.ThreadPoolExecutor(workers, "dit_jax-data") if workers > 0 else None
    self._chunks = max(workers, 1)
    self._prefetch = max(int(prefetch), 1)
    self._lock = threading.Lock()
    self._known_corrupt: set[int] = set()
    self._perms: dict[int, np.ndarray] = {}
    self.set_state({"epoch": 0, "position": 0, "skipped": 0})

  # ----------------------------------------------------------------------------------------------- state

  def get_state(self) -> dict:
    """Where the next batch starts: {"epoch", "position", "skipped"} (JSON-serialisable ints)."""
    return {"epoch": self.epoch, "position": self.position, "skipped": self.skipped}

  def set_state(self, state: dict) -> None:
    """Continue exactly where the loader that produced ``state`` was."""
    try:
      epoch, position, skipped = (int(state[k]) for k in ("epoch", "position", "skipped"))
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"bad loader state {state!r}: needs integer epoch, position, skipped") from e
    if epoch < 0 or skipped < 0 or not 0 <= position <= self.num_items:
      raise ValueError(f"bad loader state {state!r} for a dataset of {self.num_items} items")
    self._drop_pending()
    self.epoch, self.position = self._normalise(epoch, position)
    self.skipped = skipped
    self._cursor = (self.epoch, self.position)
    self._epoch_corrupt = collections.Counter()  # epoch -> corrupt first-choice items this host met (since start)

  def _normalise(self, epoch: int, position: int) -> tuple[int, int]:
    """Move to the next epoch when no (full, if drop_remainder) batch is left in this one."""
    left = self.num_items - position
    if left <= 0 or (self.drop_remainder and left < self.global_batch_size):
      return epoch + 1, 0
    return epoch, position

  # ----------------------------------------------------------------------------------------------- iteration

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    self._fill()
    epoch, size, jobs = self._pending.popleft()
    self._fill()
    parts = [job.result() if isinstance(job, concurrent.futures.Future) else job() for job in jobs]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    extra = {name: np.concatenate([p[4][name] for p in parts]) for name in self._extra}
    self.skipped += sum(p[2] for p in parts)
    self._epoch_corrupt[epoch] += sum(p[3] for p in parts)
    share = self.steps_per_epoch * self.global_batch_size // self.process_count
    if self._epoch_corrupt[epoch] > share // 2:
      raise RuntimeError(f"more than half of the items of epoch {epoch} are corrupt ({self._epoch_corrupt[epoch]} "
                         f"of this host's {share}); see the logged item indices")
    self.epoch, self.position = self._normalise(epoch, self.position + size)
    return {"image": images, "label": labels, **extra}

  def _fill(self) -> None:
    """Schedule batches until ``prefetch`` are pending."""
    while len(self._pending) < self._prefetch:
      epoch, start = self._cursor
      size = min(self.global_batch_size, self.num_items - start)
      lo = start + self.process_index * size // self.process_count
      hi = start + (self.process_index + 1) * size // self.process_count
      perm = self._permutation(epoch)
      jobs = []
      for positions in np.array_split(np.arange(lo, hi), min(self._chunks, max(hi - lo, 1))):
        args = (perm, epoch, positions)
        jobs.append(self._pool.submit(self._load, *args) if self._pool else (lambda a=args: self._load(*a)))
      self._pending.append((epoch, size, jobs))
      self._cursor = self._normalise(epoch, start + size)

  def _drop_pending(self) -> None:
    for _, _, jobs in getattr(self, "_pending", ()):
      for job in jobs:
        if isinstance(job, concurrent.futures.Future):
          job.cancel()
    self._pending = collections.deque()

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      for old in [e for e in self._perms if e < epoch - 1]:
        del self._perms[old]
      self._perms[epoch] = (np.random.default_rng([self.seed, epoch]).permutation(self.num_items) if self.shuffle
                            else np.arange(self.num_items))
    return self._perms[epoch]

  # ----------------------------------------------------------------------------------------------- decoding

  def flip(self, epoch: int, index: int) -> bool:
    """Whether item ``index`` is flipped in ``epoch``: a function of (seed, epoch, index) only."""
    return self.random_flip and bool(np.random.default_rng([self.seed, epoch, index]).random() < 0.5)

  def _read(self, index: int) -> dict | None:
    if index in self._known_corrupt:
      return None
    try:
      return self.source[index]
    except CorruptImage as e:
      with self._lock:
        if index not in self._known_corrupt:
          self._known_corrupt.add(index)
          logger.warning("skipping corrupt item %d: %s", index, e)
      return None

  def _load(self, perm: np.ndarray, epoch: int, positions: np.ndarray):
    """Positions of the epoch -> (images, labels, skipped, corrupt first choices, extra arrays)."""
    n, s, c = self.num_items, self.image_size, self.channels
    images = np.empty((len(positions), *(self._shape or (s, s, c))), np.float32)
    labels = np.empty((len(positions),), np.int32)
    extra = {name: np.empty((len(positions), *shape), np.float32) for name, shape in self._extra.items()}
    skipped = first = 0
    for row, j in enumerate(positions):
      for k in range(n // 2 + 1):
        index = int(perm[(j + k) % n])
        item = self._read(index)
        if item is not None:
          break
        skipped += 1
        first += k == 0
      else:
        raise RuntimeError(f"more than half of the {n} items are corrupt ({n // 2 + 1} in a row from position {j} of "
                           f"epoch {epoch})")
      flip = self.flip(epoch, index)
      if self._transform:
        images[row] = self._transform(item, flip=flip, seed=self.seed, epoch=epoch, index=index)
      else:
        images[row] = preprocess(item["image"], s, flip, c)
      labels[row] = item["label"]
      for name, out in extra.items():
        out[row] = item[name]
    return images, labels, skipped, first, extra

  def close(self) -> None:
    """Stop the decoding threads."""
    self._drop_pending()
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
