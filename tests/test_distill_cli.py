"""Distillation through train.py as users run it (digits data, real processes): from a tiny teacher trained once,
each objective's student (guidance_distill, meanflow, ladd), SIGKILLed mid-training and resumed, logs the per-step
metrics of an uninterrupted run bitwise (the loss and gradient norm; LADD's g_loss, d_loss, r1 and the
discriminator's gradient norm too). The uninterrupted run ends by SIGTERM: it saves a checkpoint and exits 0."""
from __future__ import annotations

import signal
import subprocess

import pytest

from tests.helpers import REPO_ROOT
from tests.helpers.processes import device_env
from tests.helpers.training import (checkpoint_steps, losses, sigkill_mid_run, step_metrics, tiny_train_cmd,
                                    wait_for_step)

# A constant learning rate from step 1 (no warm-up from 0): every step moves the networks, and no step's metrics
# depend on total_steps.
CONSTANT = ["--config.optimizer.schedule=constant", "--config.optimizer.warmup_steps=0"]
NEVER_ENDS = "--config.total_steps=1000000"

# objective -> its demo config and the flags that make it tiny (configs/ladd_demo.py's 128-channel heads would
# dwarf the hidden-32 teacher; head_channels must be a multiple of head_groups).
OBJECTIVES = {
    "guidance_distill": ("configs/distill_guidance_demo.py", []),
    "meanflow": ("configs/meanflow_demo.py", []),
    "ladd": ("configs/ladd_demo.py", ["--config.distill.ladd.head_channels=16", "--config.distill.ladd.head_groups=4",
                                      "--config.distill.ladd.cmap_dim=8"]),
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """configs/demo.py at TINY_TRAIN_FLAGS' shape, 3 steps at lr 1e-2 with EMA = parameters (the teacher loads the
  EMA; a DiT barely out of its zero initialisation would give guidance distillation a zero loss)."""
  workdir = tmp_path_factory.mktemp("teacher")
  result = subprocess.run(tiny_train_cmd("configs/demo.py", workdir, *CONSTANT, "--config.optimizer.lr=1e-2",
                                         "--config.ema_decay=0", "--config.total_steps=3"),
                          capture_output=True, text=True, env=device_env(1), cwd=REPO_ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_sigkill_then_resume_gives_identical_metrics(tmp, teacher, objective):
  """As tests/test_train_cli.py's SIGKILL test, with a checkpoint every 2 steps and the kill after step 3."""
  config, flags = OBJECTIVES[objective]

  def cmd(workdir, *extra):
    return tiny_train_cmd(config, workdir, *CONSTANT, "--config.optimizer.lr=1e-3",
                          "--config.checkpoint_every_steps=2", f"--config.teacher.checkpoint={teacher}", *flags, *extra)

  killed_at, saved = sigkill_mid_run(cmd(tmp / "killed", NEVER_ENDS), tmp / "killed", 3, device_env(1))
  print(f"{objective}: killed after step {killed_at}, resuming from the step-{saved[-1]} checkpoint")
  end = killed_at + 2
  result = subprocess.run(cmd(tmp / "killed", f"--config.total_steps={end}"), capture_output=True, text=True,
                          env=device_env(1), cwd=REPO_ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed from step {saved[-1]} " in result.stderr, result.stderr[-3000:]

  # the uninterrupted run: past `end`, then SIGTERM (handled at the next step: a checkpoint of it, exit status 0)
  proc = subprocess.Popen(cmd(tmp / "full", NEVER_ENDS), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, env=device_env(1), cwd=REPO_ROOT)
  try:
    wait_for_step(tmp / "full", end, proc)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1]
  finally:
    proc.kill()
    proc.wait()
  assert proc.returncode == 0 and "SIGTERM: saving a checkpoint" in stderr, stderr[-3000:]
  assert checkpoint_steps(tmp / "full")[-1] == max(losses(tmp / "full")), (checkpoint_steps(tmp / "full"),
                                                                          stderr[-3000:])

  full, resumed = step_metrics(tmp / "full"), step_metrics(tmp / "killed")
  assert sorted(resumed) == list(range(1, end + 1)) and set(resumed) <= set(full), (sorted(resumed), sorted(full))
  differ = [(s, {k: (full[s].get(k), resumed[s].get(k)) for k in sorted(full[s].keys() | resumed[s].keys())
                 if full[s].get(k) != resumed[s].get(k)}) for s in sorted(resumed) if full[s] != resumed[s]]
  assert not differ, f"{objective}: metrics after SIGKILL + resume differ from the uninterrupted run " \
                     f"(step, {{key: (uninterrupted, resumed)}}): {differ[:3]}"
