#!/usr/bin/env python
"""Train a DiT or an MMDiT: python train.py --config configs/X.py --workdir DIR [--config.key=value ...]

Resumes automatically from the latest checkpoint in DIR. Prints one line per log step (step/total, loss, steps/s,
ETA, MFU); metrics also go to DIR/metrics.jsonl and TensorBoard. Multi-host: set --config.distributed.initialize=True
(plus coordinator_address / num_processes / process_id where the cluster is not auto-detected). Configuration and
input errors are reported in one line with exit status 2.
"""
from __future__ import annotations

import logging
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # before TensorFlow (clu, data) loads: no C++ start-up lines

import ml_collections  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dit_jax.cli import fail  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and samples")


def _config() -> ml_collections.ConfigDict:
  """The parsed --config; ValueError (one line) when its file did not load or get_config() gave no ConfigDict."""
  config, path = _CONFIG.value, config_flags.get_config_filename(flags.FLAGS["config"])
  try:
    getattr(config, "keys", None)  # a config file that failed to load raises its error on any attribute
  except OSError as e:
    raise ValueError(f"cannot load --config {path}: {str(e).strip().splitlines()[-1].strip()}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f"--config {path}: get_config() must return a ConfigDict, not {type(config).__name__}")
  return config


def _one_line(e: Exception) -> str:
  key = e.args[0] if isinstance(e, AttributeError) and e.args and isinstance(e.args[0], KeyError) else e
  if isinstance(key, KeyError):  # ConfigDict's error for an override of a key the config does not have
    name = str(key.args[0] if key.args else key).strip("'\"")
    return f"unknown config key {name!r} (dit_jax/train_config.py lists every key)"
  return str(e).strip().splitlines()[0]


def main(argv) -> int:
  try:
    flags.FLAGS(argv)
    if _CONFIG.value is None or flags.FLAGS.workdir is None:
      raise ValueError("--config and --workdir are required")
    config = _config()
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError, SyntaxError) as e:
    return fail(_one_line(e))
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s: %(message)s", force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)  # libraries' INFO chatter; progress is the "dit_jax" logger
  import jax

  d = config.distributed
  if d.initialize:
    kw = {}
    if d.coordinator_address:
      kw = dict(coordinator_address=d.coordinator_address, num_processes=d.num_processes, process_id=d.process_id)
    jax.distributed.initialize(**kw)
  from dit_jax.train import TrainingError, train
  from dit_jax.train_config import validate

  try:
    validate(config)
    train(config, flags.FLAGS.workdir)
  except (ValueError, TrainingError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError) as e:
    return fail(e)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
