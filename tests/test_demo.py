"""The embedded demos end to end through their commands (slow: `python -m pytest -m slow tests/test_demo.py`;
.ci/run runs the same commands after the suite). No package reinstall: demo.sh runs with this interpreter.

* DiT (demo.sh): trains the digits DiT, writes a PNG grid, scores the samples with a classifier trained on the real
  digits (target >= 95%).
* MMDiT (configs/mmdit_demo.py): train, the sample grid, and the classifier score of class-token samples (>= 90%).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO_ROOT
from tests.helpers.processes import run_cli


@pytest.mark.slow
def test_demo_command_trains_samples_and_scores(tmp):
  result = subprocess.run(["bash", str(REPO_ROOT / "demo.sh"), str(tmp / "demo")], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=1200, env=dict(os.environ, DEMO_PYTHON=sys.executable))
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  grid = np.asarray(Image.open(tmp / "demo" / "digits.png"))
  assert grid.shape == (2 * (64 + 2) + 2, 10 * (64 + 2) + 2)  # 2 rows of 10 digits, 8x zoom, grey
  score = float(re.search(r"requested class: ([\d.]+)%", result.stdout).group(1))
  print(f"demo classifier score: {score}%")
  assert score >= 95.0


@pytest.mark.slow
def test_mmdit_digits_demo_reaches_90_percent(tmp):
  """configs/mmdit_demo.py end to end through the CLIs: train (600 steps, ~1 min on 2 cores), the sample grid,
  and the classifier score of 500 class-token samples (measured: 100%)."""
  result = run_cli("train.py", "--config", REPO_ROOT / "configs/mmdit_demo.py", "--workdir", tmp / "w", timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  grid = np.asarray(Image.open(tmp / "w" / "samples" / "0000600.png"))
  assert grid.ndim == 2 and grid.std() > 10  # 20 grey digits, not a blank image
  result = run_cli("tools/demo_quality.py", tmp / "w", "--per-class", 50, "--target", 0.90, timeout=900)
  score = re.search(r"requested class: ([\d.]+)%", result.stdout)
  assert result.returncode == 0 and score, result.stdout[-2000:] + result.stderr[-2000:]
  print(f"MMDiT demo classifier score: {score.group(1)}%")
  assert float(score.group(1)) >= 90.0
  result = run_cli("sample.py", "--checkpoint", tmp / "w", "--class-labels", "0,1,2,3", "--steps", 8,
                   "--cfg-scale", 2.0, "--out", tmp / "digits.png", timeout=900)
  assert result.returncode == 0 and Image.open(tmp / "digits.png").size[0] > 0, result.stderr[-2000:]
