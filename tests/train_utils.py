"""Helpers for the training tests: a tiny config and a deterministic, resumable in-memory loader."""
from __future__ import annotations

import json
import pathlib

import numpy as np

from dit_jax.train_config import default_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(objective: str = "flow", steps: int = 6, batch: int = 8):
  c = default_config()
  c.total_steps = steps
  c.global_batch_size = batch
  c.model.update(name="", input_size=8, in_channels=1, num_classes=10, learn_sigma=objective == "vp",
                 hidden_size=32, depth=2, num_heads=2, patch_size=2)
  c.objective = objective
  c.optimizer.update(lr=1e-3, warmup_steps=2)
  c.ema_decay = 0.9
  c.log_every_steps = 1
  c.checkpoint_every_steps = 3
  c.keep_checkpoints = 10
  c.keep_period = 0
  c.sample.update(method="euler" if objective == "flow" else "ddim", steps=3, num=4)
  return c


class ToyLoader:
  """Batch i is a function of (seed, i) only; ``nan_from`` poisons every batch from that index on."""

  def __init__(self, batch: int, seed: int = 0, nan_from: int | None = None, process_index: int = 0,
               process_count: int = 1):
    self.batch, self.seed, self.nan_from, self.pos = batch, seed, nan_from, 0
    self.local = slice(process_index * batch // process_count, (process_index + 1) * batch // process_count)

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.pos])
    image = rng.uniform(-1, 1, (self.batch, 8, 8, 1)).astype(np.float32)
    if self.nan_from is not None and self.pos >= self.nan_from:
      image[:] = np.nan
    self.pos += 1
    return {"image": image[self.local], "label": rng.integers(0, 10, self.batch).astype(np.int32)[self.local]}

  def get_state(self):
    return {"pos": self.pos}

  def set_state(self, state):
    self.pos = state["pos"]


def losses(workdir: pathlib.Path) -> dict[int, float]:
  """step -> loss from metrics.jsonl (the last entry wins when a resumed run re-logged a step)."""
  out = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    out[row["step"]] = row["loss"]
  return out
