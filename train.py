#!/usr/bin/env python
"""Train a DiT or an MMDiT: python train.py --config configs/X.py --workdir DIR [--config.key=value ...]

Resumes automatically from the latest checkpoint in DIR. Multi-host: set --config.distributed.initialize=True
(plus coordinator_address / num_processes / process_id where the cluster is not auto-detected). Configuration and
input errors are reported in one line with exit status 2.
"""
from __future__ import annotations

import logging
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and samples")


def main(argv) -> int:
  try:
    flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
    return 2
  if _CONFIG.value is None or flags.FLAGS.workdir is None:
    print("error: --config and --workdir are required", file=sys.stderr)
    return 2
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  config = _CONFIG.value
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
  except (ValueError, TrainingError) as e:
    print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
