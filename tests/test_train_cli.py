"""train.py as users run it (digits data, real processes): SIGKILL mid-training then resume reproduces the
uninterrupted per-step losses bitwise; SIGTERM saves a checkpoint and exits 0."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.train_utils import REPO_ROOT, losses

TINY = ["--config.model.hidden_size=32", "--config.model.depth=2", "--config.model.num_heads=2",
        "--config.global_batch_size=16", "--config.log_every_steps=1", "--config.checkpoint_every_steps=3",
        "--config.sample_every_steps=0", "--config.keep_checkpoints=10"]


def _cmd(workdir, *extra):
  return [sys.executable, str(REPO_ROOT / "train.py"), "--config", str(REPO_ROOT / "configs/demo.py"),
          "--workdir", str(workdir), *TINY, *extra]


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _wait_for_step(workdir, step, proc, timeout=240):
  deadline = time.time() + timeout
  path = workdir / "metrics.jsonl"
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"trainer exited early: {proc.stderr.read()[-3000:]}")
    if path.exists():
      rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
      if rows and rows[-1]["step"] >= step:
        return
    time.sleep(0.2)
  raise AssertionError(f"step {step} not reached")


def test_sigkill_then_resume_gives_identical_losses(tmp):
  steps = "--config.total_steps=12"
  subprocess.run(_cmd(tmp / "full", steps), check=True, capture_output=True, env=_env(), cwd=REPO_ROOT)
  proc = subprocess.Popen(_cmd(tmp / "killed", steps), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=_env(), cwd=REPO_ROOT)
  _wait_for_step(tmp / "killed", 7, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  result = subprocess.run(_cmd(tmp / "killed", steps), capture_output=True, text=True, env=_env(), cwd=REPO_ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  full, resumed = losses(tmp / "full"), losses(tmp / "killed")
  assert sorted(full) == sorted(resumed) == list(range(1, 13))
  assert full == resumed, "losses after SIGKILL + resume differ from the uninterrupted run"


def test_sigterm_saves_and_exits_zero(tmp):
  proc = subprocess.Popen(_cmd(tmp, "--config.total_steps=100000", "--config.checkpoint_every_steps=100000"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO_ROOT)
  _wait_for_step(tmp, 4, proc)
  proc.send_signal(signal.SIGTERM)
  try:
    proc.wait(timeout=120)
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail("trainer did not exit after SIGTERM")
  assert proc.returncode == 0, proc.stderr.read()[-3000:]
  saved = sorted(int(p.name) for p in (tmp / "checkpoints").iterdir() if p.name.isdigit())
  last_logged = max(losses(tmp))
  assert saved and saved[-1] == last_logged >= 4
