"""train.py as users run it (digits data, real processes): SIGKILL mid-training then resume reproduces the
uninterrupted per-step losses bitwise; SIGTERM saves a checkpoint and exits 0."""
from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT
from tests.helpers.processes import device_env, one_line_error
from tests.helpers.training import checkpoint_steps, losses, sigkill_mid_run, tiny_train_cmd, wait_for_step


def _cmd(workdir, *extra):
  return tiny_train_cmd("configs/demo.py", workdir, *extra)


def test_sigkill_then_resume_gives_identical_losses(tmp):
  """The run to kill is given far more steps than it can ever finish, so the SIGKILL always lands mid-training,
  after a finished checkpoint. A constant (warmup) learning rate makes every step's loss independent of
  total_steps, so the resumed run and the uninterrupted reference both stop a few steps past the kill."""
  constant = "--config.optimizer.schedule=constant"
  killed_at, saved = sigkill_mid_run(_cmd(tmp / "killed", constant, "--config.total_steps=1000000"), tmp / "killed", 7,
                                     device_env(1))
  print(f"killed after step {killed_at}, resuming from the step-{saved[-1]} checkpoint")
  steps = f"--config.total_steps={killed_at + 3}"
  result = subprocess.run(_cmd(tmp / "killed", constant, steps), capture_output=True, text=True, env=device_env(1),
                          cwd=REPO_ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed from step {saved[-1]} " in result.stderr, result.stderr[-3000:]
  subprocess.run(_cmd(tmp / "full", constant, steps), check=True, capture_output=True, env=device_env(1),
                 cwd=REPO_ROOT)
  full, resumed = losses(tmp / "full"), losses(tmp / "killed")
  assert sorted(full) == sorted(resumed) == list(range(1, killed_at + 4))
  assert full == resumed, "losses after SIGKILL + resume differ from the uninterrupted run"


def test_sigterm_saves_and_exits_zero(tmp):
  proc = subprocess.Popen(_cmd(tmp, "--config.total_steps=100000", "--config.checkpoint_every_steps=100000"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=device_env(1),
                          cwd=REPO_ROOT)
  wait_for_step(tmp, 4, proc)
  proc.send_signal(signal.SIGTERM)
  try:
    proc.wait(timeout=120)
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail("trainer did not exit after SIGTERM")
  stderr = proc.stderr.read()
  assert proc.returncode == 0, stderr[-3000:]
  saved = checkpoint_steps(tmp)
  last_logged = max(losses(tmp))
  assert saved and saved[-1] == last_logged >= 4, (saved, last_logged, sorted(
      p.name for p in (tmp / "checkpoints").iterdir()) if (tmp / "checkpoints").is_dir() else None, stderr[-3000:])
  # a run that fails on a user error leaves the existing workdir as it was
  before = {p: p.read_bytes() for p in sorted(tmp.rglob("*")) if p.is_file()}
  result = subprocess.run(_cmd(tmp, "--config.objective=score"), capture_output=True, text=True, env=device_env(1),
                          cwd=REPO_ROOT)
  one_line_error(result.returncode, result.stderr, "objective 'score'")
  assert {p: p.read_bytes() for p in sorted(tmp.rglob("*")) if p.is_file()} == before


@pytest.mark.parametrize("args,fragment", [
    ([], "--config and --workdir are required"),
    (["--workdir", "{tmp}/w"], "--config and --workdir are required"),
    (["--config", "configs/demo.py"], "--config and --workdir are required"),
    (["--config", "{tmp}/missing.py", "--workdir", "{tmp}/w"], "missing.py"),
    (["--config", "{tmp}/broken.py", "--workdir", "{tmp}/w"], "broken.py"),
    (["--config", "configs/demo.py", "--workdir", "{tmp}/w", "--config.model.widht=3"], "widht"),
    (["--config", "configs/demo.py", "--workdir", "{tmp}/w", "--config.total_steps=many"], "total_steps"),
    (["--config", "configs/demo.py", "--workdir", "{tmp}/file"], "file"),
    (["--config", "configs/demo.py", "--workdir", "{tmp}/w", "--config.data.source=folder",
      "--config.data.folder={tmp}/absent"], "absent"),
    (["--nonsense"], "nonsense"),
])
def test_user_errors_are_one_line(tmp, args, fragment):
  (tmp / "broken.py").write_text("def get_config(:\n")
  (tmp / "file").write_text("not a directory")
  result = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *(a.format(tmp=tmp) for a in args)],
                          capture_output=True, text=True, env=device_env(1), cwd=REPO_ROOT)
  one_line_error(result.returncode, result.stderr, fragment)
  assert (tmp / "file").read_text() == "not a directory"


def test_console_shows_one_progress_line_per_log_step_and_nothing_else(tmp):
  """The console of a training job: which MFU denominator, then one line per log step; no TF / clu / absl INFO."""
  env = {k: v for k, v in device_env(1).items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  result = subprocess.run(_cmd(tmp, "--config.total_steps=4", "--config.log_every_steps=2"), capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  output = [ln for ln in (result.stdout + result.stderr).splitlines() if ln.strip()]
  other = [ln for ln in output if " INFO: " not in ln and " WARNING: " not in ln]  # e.g. TF's C++ start-up lines
  assert not other, other
  lines = [ln.split(" INFO: ", 1)[1] for ln in output if " INFO: " in ln]
  assert lines[0].startswith("MFU against a measured float32 matmul rate"), lines
  assert [ln.split("  ")[0] for ln in lines[1:]] == ["step 2/4", "step 4/4"], lines  # no clu / absl INFO lines
  assert all(re.fullmatch(r"step \d/4  loss \d\.\d{4}  [\d.]+ steps/s  ETA \d:\d\d:\d\d  MFU [\d.]+%", ln)
             for ln in lines[1:]), lines
