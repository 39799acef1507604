"""Training helpers: tiny DiT / MMDiT configs, deterministic resumable in-memory loaders, per-step losses and
metrics, and the workdir of a train.py process (its finished checkpoints, waiting for a logged step)."""
from __future__ import annotations

import json
import pathlib
import sys
import time

import numpy as np

from dit_jax.train_config import default_config
from tests.helpers import REPO_ROOT


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
    if "loss" in row:  # not an evaluation's line
      out[row["step"]] = row["loss"]
  return out


TIMING_METRICS = ("steps_per_s", "examples_per_s", "mfu")  # the metrics.jsonl keys that depend on the clock


def step_metrics(workdir: pathlib.Path) -> dict[int, dict[str, float]]:
  """step -> that step's metrics from metrics.jsonl less TIMING_METRICS (the last entry wins, as in ``losses``)."""
  out = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if "loss" in row:
      out[row["step"]] = {k: v for k, v in row.items() if k not in TIMING_METRICS}
  return out


# train.py flags of a tiny digits DiT (configs/demo.py's shape at hidden 32, depth 2, 2 heads, batch 16): every step
# logged, a checkpoint every 3 steps (all kept), no sample grids.
TINY_TRAIN_FLAGS = ["--config.model.hidden_size=32", "--config.model.depth=2", "--config.model.num_heads=2",
                    "--config.global_batch_size=16", "--config.log_every_steps=1", "--config.checkpoint_every_steps=3",
                    "--config.sample_every_steps=0", "--config.keep_checkpoints=10"]


def tiny_train_cmd(config: str, workdir: pathlib.Path, *flags: str) -> list[str]:
  """The command line of ``train.py --config <repo>/<config>`` in ``workdir`` with TINY_TRAIN_FLAGS, then ``flags``
  (a later flag overrides an earlier one)."""
  return [sys.executable, str(REPO_ROOT / "train.py"), "--config", str(REPO_ROOT / config), "--workdir", str(workdir),
          *TINY_TRAIN_FLAGS, *flags]


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  """Steps of the finished checkpoints (orbax writes a temporary directory, then renames it to the step)."""
  root = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def wait_for_step(workdir: pathlib.Path, step: int, proc, timeout: float = 300, checkpoint: bool = False) -> None:
  """Until the train.py process ``proc`` (a Popen with stderr=PIPE) has logged ``step`` in metrics.jsonl (and, with
  ``checkpoint``, finished a checkpoint); AssertionError when it exits first or the time runs out."""
  deadline = time.time() + timeout
  path = pathlib.Path(workdir) / "metrics.jsonl"
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"trainer exited early: {proc.stderr.read()[-3000:]}")
    if path.exists() and (not checkpoint or checkpoint_steps(workdir)):
      rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
      if rows and rows[-1]["step"] >= step:
        return
    time.sleep(0.2)
  raise AssertionError(f"step {step} not reached in {timeout} s")


def sigkill_mid_run(cmd: list[str], workdir: pathlib.Path, step: int, env: dict) -> tuple[int, list[int]]:
  """Run the train.py command ``cmd`` (its total_steps far out of reach) until it has logged ``step`` and finished a
  checkpoint, SIGKILL it, and return (last logged step, finished checkpoint steps), asserting it died mid-run."""
  import signal
  import subprocess

  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
  try:
    wait_for_step(workdir, step, proc, checkpoint=True)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  assert proc.returncode == -signal.SIGKILL, proc.returncode
  killed_at, saved = max(losses(workdir)), checkpoint_steps(workdir)
  assert step <= killed_at < 1000000 and saved and saved[-1] <= killed_at, (killed_at, saved)  # interrupted, mid-run
  return killed_at, saved


def tiny_mmdit_config(steps: int = 6, batch: int = 8):
  """A 2-layer MMDiT (hidden 32, 2 heads, QK RMSNorm, MMDiT-X attention in layer 0) on 8x8x1 class tokens."""
  c = tiny_config("flow", steps, batch)
  c.model.kind = "mmdit"
  c.mmdit.update(sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=32, pooled_projection_dim=8,
                 pos_embed_max_size=4, qk_norm="rms_norm", dual_attention_layers=(0,))
  c.flow.update(convention="sd3", t_sampler="logit_normal", shift=3.0)
  c.data.update(conditioning="class_tokens", class_token_length=3)
  c.sample.update(method="euler", steps=3, num=4, cfg_scale=2.0)
  return c


def tiny_flux_config(steps: int = 6, batch: int = 8):
  """A FLUX with 1 double and 1 single block (2 heads of 16, rotary 4 + 6 + 6), guidance-distilled with a random
  guidance in [1, 5], on 8x8x1 latents (16 tokens) and ToyTextLoader's context (B, 3, 16) / pooled (B, 8)."""
  c = tiny_config("flow", steps, batch)
  c.model.kind = "flux"
  c.flux.update(in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6),
                guidance_embeds=True, guidance_range=(1.0, 5.0), sample_size=8)
  c.flow.update(convention="flux", t_sampler="logit_normal", resolution_shift=True)
  c.data.update(conditioning="class_tokens", class_token_length=3)
  c.sample_every_steps = 0
  return c


class ToyTextLoader(ToyLoader):
  """ToyLoader batches plus "context" (B, 3, 16) and "pooled" (B, 8), a function of (seed, i) only."""

  num_classes = 10

  def __next__(self):
    batch = super().__next__()
    rng = np.random.default_rng([self.seed, self.pos, 1])
    context = rng.standard_normal((self.batch, 3, 16)).astype(np.float32)
    pooled = rng.standard_normal((self.batch, 8)).astype(np.float32)
    return {**batch, "context": context[self.local], "pooled": pooled[self.local]}
