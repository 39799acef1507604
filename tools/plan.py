#!/usr/bin/env python
"""Will this training config fit, and how fast will it run? Compile its real train step ahead of time for a TPU
topology (libtpu's deviceless compile: no TPU needed) and report XLA's own figures per chip.

  python tools/plan.py --config configs/dit_xl2_256.py --topology v5p:2x2x1 [--config.key=value ...] [--json]
  python tools/plan.py --config configs/mmdit_sd35m_latents.py --topology v5p:2x2x4 --context-length 333
  python tools/plan.py --config configs/demo.py --topology local      # this machine's own devices (e.g. a GPU)

Prints per-chip HBM (arguments, temporaries, outputs, total against the chip's HBM), compile time, XLA's FLOPs, the
collectives in the compiled HLO (all-gathers of activations counted apart from parameter gathers), the custom-call
kernels, XLA's cost-model step time and the MFU it implies against the chip's published bf16 peak (model FLOPs:
3 x forward). ``--sample`` compiles the jitted sampler as well. TPU topologies need ``pip install -e .[tpu]``;
GPUs cannot be compiled for without the GPU (use ``--topology local`` on the GPU machine).
"""
from __future__ import annotations

import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host compiles; a TPU topology needs no TPU backend
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dit_jax.cli import fail  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x4, v5p:2x2x1, v6e:2x4; or 'local'")
flags.DEFINE_integer("context_length", None, "text tokens per example for text-conditioned kinds (default 333)")
flags.DEFINE_boolean("sample", False, "also compile the jitted sampler (config.sample: method, steps, CFG)")
flags.DEFINE_boolean("json", False, "print one JSON object instead of the table")
GPU_PREFIXES = ("h100", "h200", "a100", "b200", "gpu", "l4")


def main(argv) -> int:
  try:
    flags.FLAGS(argv)
    if _CONFIG.value is None or flags.FLAGS.topology is None:
      raise ValueError("--config and --topology are required")
    topology = flags.FLAGS.topology
    if topology.lower().startswith(GPU_PREFIXES):
      raise ValueError(f"cannot compile for {topology} without the device: XLA has no deviceless GPU compile; run "
                       "this with --topology local on the GPU machine")
    config = _CONFIG.value
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    return fail(e)
  import json

  from dit_jax import planner

  try:
    report = planner.plan(config, topology, context_length=flags.FLAGS.context_length, sample=flags.FLAGS.sample)
  except (ValueError, planner.PlanError) as e:
    return fail(e)
  print(json.dumps(report, indent=1) if flags.FLAGS.json else planner.format_report(report))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
