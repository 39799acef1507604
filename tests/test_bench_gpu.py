"""bench/gpu.sh end to end except the GPU: the shell script parses, and its Python part prints the full table in
its CPU dry mode (DiT-S/2, batch 2, one iteration, attention "xla")."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT


@pytest.mark.slow  # four minutes of CPU compiles and torch reference runs for a script made for the GPU
def test_gpu_bench_script_parses_and_its_dry_run_prints_one_row_per_measurement():
  script = REPO_ROOT / "bench/gpu.sh"
  assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
  env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
  result = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, env=env, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [ln.split(" | ")[:4] for ln in result.stdout.splitlines() if ln.startswith("| DiT")]
  assert rows == [["| DiT-S/2", what, "xla", "2"] for what in ("forward", "sample (2 steps)", "train")], result.stdout
  assert not result.stderr.strip(), result.stderr[-3000:]
