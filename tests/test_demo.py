"""The README's main-job command, end to end: demo.sh installs, trains the digits DiT, writes a PNG grid and scores
the samples with a classifier trained on the real digits (target >= 95%)."""
from __future__ import annotations

import re
import subprocess

import numpy as np
from PIL import Image

from tests.train_utils import REPO_ROOT


def test_demo_command_trains_samples_and_scores(tmp):
  result = subprocess.run(["bash", str(REPO_ROOT / "demo.sh"), str(tmp / "demo")], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=1200)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  grid = np.asarray(Image.open(tmp / "demo" / "digits.png"))
  assert grid.shape == (2 * (64 + 2) + 2, 10 * (64 + 2) + 2)  # 2 rows of 10 digits, 8x zoom, grey
  score = float(re.search(r"requested class: ([\d.]+)%", result.stdout).group(1))
  print(f"demo classifier score: {score}%")
  assert score >= 95.0
