"""sample.py: PNG grid and ADM .npz output, determinism, resume after interruption, one-line errors."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import dit_jax
from dit_jax import sampling
from dit_jax.convert import convert
from tests.conftest import diffusers_dit

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("ckpt")
  diffusers_dit(depth=1, sample_size=8, num_classes=10, heads=2, head_dim=16).save_pretrained(tmp / "dit")
  convert(tmp / "dit", tmp / "ckpt")
  return tmp / "ckpt"


def _run(*args):
  return subprocess.run([sys.executable, str(REPO / "sample.py"), *map(str, args)], capture_output=True, text=True,
                        cwd=REPO)


def test_png_grid_is_written_and_reproducible(ckpt, tmp):
  args = ["--checkpoint", ckpt, "--class-labels", "1,2,3,10", "--method", "ddim", "--steps", "5",
          "--cfg-scale", "4.0", "--seed", "0"]
  for name in ("a.png", "b.png"):
    result = _run(*args, "--out", tmp / name)
    assert result.returncode == 0, result.stderr
  assert (tmp / "a.png").read_bytes() == (tmp / "b.png").read_bytes()
  grid = np.asarray(Image.open(tmp / "a.png"))
  assert grid.shape == (2 * 10 + 2, 2 * 10 + 2, 3)  # 2x2 grid of 8x8 with 2-pixel padding
  assert _run(*args[:-1], "1", "--out", tmp / "c.png").returncode == 0
  assert (tmp / "c.png").read_bytes() != (tmp / "a.png").read_bytes()


def test_npz_matches_adm_format_and_is_reproducible(ckpt, tmp):
  args = ["--checkpoint", ckpt, "--num-samples", "5", "--batch-size", "2", "--method", "ddpm", "--steps", "4",
          "--cfg-scale", "1.5", "--cfg-mode", "dit"]
  for name in ("a.npz", "b.npz"):
    result = _run(*args, "--out", tmp / name)
    assert result.returncode == 0, result.stderr
  assert (tmp / "a.npz").read_bytes() == (tmp / "b.npz").read_bytes()
  data = np.load(tmp / "a.npz")
  assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (5, 8, 8, 4)
  assert data["labels"].shape == (5,) and data["labels"].max() < 10
  assert not (tmp / "a.npz.shards").exists()


def test_interrupted_npz_run_resumes(ckpt, tmp, caplog):
  model = dit_jax.load(ckpt)
  kw = dict(method="ddim", steps=3, cfg_scale=2.0, progress=False)
  full = sampling.sample_to_npz(model, tmp / "full.npz", 7, 3, seed=5, **kw)
  # an interrupted run: only the first batch's shard made it to disk, plus a stray temporary file
  sampling.sample_to_npz(model, tmp / "part.npz", 3, 3, seed=5, keep_shards=True, **kw)
  shards = tmp / "resumed.npz.shards"
  (tmp / "part.npz.shards").rename(shards)
  (shards / ".000001.npz.tmp-123.npz").write_bytes(b"partial")
  with caplog.at_level("INFO", logger="dit_jax"):
    sampling.sample_to_npz(model, tmp / "resumed.npz", 7, 3, seed=5, **kw)
  assert "resuming: 1 of 3 batches" in caplog.text
  a, b = np.load(full), np.load(tmp / "resumed.npz")
  np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
  np.testing.assert_array_equal(a["labels"], b["labels"])


def test_quantisation_matches_sample_ddp():
  x = np.array([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0], np.float32)
  np.testing.assert_array_equal(sampling.to_uint8(x), [0, 0, 64, 128, 255, 255, 255])


@pytest.mark.parametrize("extra,fragment", [
    (["--class-labels", "1,10,11"], "class id 11 is out of range 0..9"),
    (["--class-labels", "1,x"], "comma-separated integers"),
    (["--class-labels", "1", "--method", "plms"], "unknown method 'plms'"),
    (["--class-labels", "1", "--steps", "0"], "steps must be a positive integer"),
    (["--class-labels", "1", "--respacing", "ddim600"], "cannot take exactly 600"),
    (["--class-labels", "1", "--steps", "5000"], "exceeds the 1000 training timesteps"),
])
def test_bad_input_gets_one_line_error(ckpt, tmp, extra, fragment):
  result = _run("--checkpoint", ckpt, "--out", tmp / "x.png", *extra)
  lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not ln.startswith("INFO")]
  assert result.returncode == 2 and len(lines) == 1 and fragment in lines[0], result.stderr
  assert not (tmp / "x.png").exists()


def test_missing_checkpoint_is_one_line(tmp):
  result = _run("--checkpoint", tmp / "nope", "--class-labels", "1", "--out", tmp / "x.png")
  assert result.returncode == 2 and result.stderr.strip().startswith("error: ") and "\n" not in result.stderr.strip()
