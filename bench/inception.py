#!/usr/bin/env python
"""FID Inception-v3 feature extraction: dit_jax's jitted InceptionV3 vs torch-fidelity's FeatureExtractorInceptionV3.

Both sides hold the same random weights: torch-fidelity's weight file is written with random weights (as
tests/helpers/inception_reference.py does for the parity tests) and converted by dit_jax.convert.inception_tables.
Both take the same uint8 (B, H, W, 3) numpy batch and return numpy features; each timed call covers the whole path:

  dit_jax         model(images) jitted (what dit_jax.eval.evaluator.extract runs per batch): TF1 resize to 299,
                  (x - 128) / 128, the network, all three ADM outputs pool3 (B, 2048), spatial (B, 2023) and
                  logits (B, 1008), then device_get.
  torch-fidelity  NHWC -> NCHW, forward with features ["2048", "logits_unbiased"] (its TF1 resize included) under
                  inference_mode; the sFID spatial features (mixed_6/conv = Mixed_6d.branch1x1, which torch-fidelity
                  does not return) are kept by a forward hook on that module, sliced to 7 channels and flattened.

fp32 on both sides, default thread counts (torch.get_num_threads(), XLA's own pool). Timing is interleaved
(ours, theirs, ours, ...) so that load from other processes hits both sides alike; medians of --iters rounds after
one warm-up call each. FLOPs per image: 2 x the multiply-accumulates of every convolution and the fc, counted by
forward hooks on the torch module at 299 x 299 (the network only; XLA's cost analysis of the whole compiled
function, resize included, is printed beside it). MFU is against each framework's own measured fp32 matmul rate
(bench/common.matmul_peak_flops, the higher of a measurement before and after the timing).

  python bench/inception.py [--batch 16] [--size 256] [--iters 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from common import matmul_peak_flops  # also puts the repository root on sys.path

SIZES = (64, 256, 512)


def network_flops(model: torch.nn.Module) -> float:
  """2 x multiply-accumulates of one image through the torch network at 299 x 299 (every Conv2d, plus the fc)."""
  macs = []

  def hook(m, _, out):
    macs.append(out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1])

  handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
  with torch.inference_mode():
    model(torch.zeros((1, 3, 299, 299), dtype=torch.uint8))
  for h in handles:
    h.remove()
  return 2.0 * (sum(macs) + model.fc.in_features * model.fc.out_features)


def build_pair(workdir: str):
  """(torch-fidelity extractor, our converted InceptionV3) with the same random weights, through the weight file."""
  from tests.helpers import inception_reference as ref
  from dit_jax.convert import inception_tables

  path = os.path.join(workdir, "weights-inception-2015-12-05-6726825d.pth")
  try:
    ref.torch_fidelity_file(path)
  except BaseException as e:  # pytest's skip when torch-fidelity is missing
    if type(e).__name__ != "Skipped":
      raise
    sys.exit(f"bench/inception.py: {e}")
  theirs = ref.torch_fidelity_extractor(path)
  tensors = {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}
  layout = inception_tables.detect_layout(tensors)
  ours = inception_tables.to_model(tensors, inception_tables.infer_config(tensors, layout), layout)
  return theirs, ours


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--size", type=int, default=256, help=f"image side in pixels (e.g. {', '.join(map(str, SIZES))})")
  p.add_argument("--iters", type=int, default=5)
  args = p.parse_args()
  if args.batch < 1 or args.iters < 1 or args.size < 1:
    p.error(f"--batch, --size and --iters must be positive, got {args.batch}, {args.size}, {args.iters}")
  from flax import nnx

  from tests.helpers import inception_reference as ref

  load = [os.getloadavg()[0]]
  peaks = [matmul_peak_flops()]
  with tempfile.TemporaryDirectory() as workdir:
    theirs, ours = build_pair(workdir)
  images = ref.random_images(args.batch, args.size, args.size, seed=args.size)
  flops = network_flops(theirs)

  graphdef, state = nnx.split(ours)
  start = time.perf_counter()
  compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, jnp.asarray(images)).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", float("nan"))) / args.batch if cost else float("nan")

  run_ours = lambda: jax.device_get(compiled(state, jnp.asarray(images)))

  def theirs_timed():
    with torch.inference_mode():
      return ref.torch_fidelity_features(theirs, images)

  a, b = run_ours(), theirs_timed()  # warm-up; also the outputs compared below
  times = {"ours": [], "theirs": []}
  for _ in range(args.iters):
    for name, fn in (("ours", run_ours), ("theirs", theirs_timed)):
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
    load.append(os.getloadavg()[0])
  peaks.append(matmul_peak_flops())
  peak = {k: max(pk[k] for pk in peaks) for k in ("jax", "torch")}
  ours_s, theirs_s = (float(np.median(times[k])) for k in ("ours", "theirs"))
  err = {k: float(np.abs(np.asarray(a[k], np.float64) - b[k]).max() / np.abs(b[k]).max()) for k in b}

  print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} "
        f"({jax.default_backend()}, XLA default threads, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
  print(f"# fp32 matmul peak (2048^2, max of before/after): jax {peak['jax'] / 1e9:.1f} GFLOP/s, "
        f"torch {peak['torch'] / 1e9:.1f} GFLOP/s (before: jax {peaks[0]['jax'] / 1e9:.1f}, "
        f"torch {peaks[0]['torch'] / 1e9:.1f})")
  print(f"# GFLOP/img: network (hooks, 299 px) {flops / 1e9:.2f}, XLA cost analysis of the whole call "
        f"{xla_flops / 1e9:.2f}; rel err spatial {err['spatial']:.1e}, logits {err['logits']:.1e}")
  print(f"# 1-min load average: {' '.join(f'{x:.1f}' for x in load)} (start, then after each round)")
  print(f"# per-round seconds: dit_jax {' '.join(f'{x:.2f}' for x in times['ours'])}; "
        f"torch-fidelity {' '.join(f'{x:.2f}' for x in times['theirs'])}; median of the per-round ratios "
        f"{np.median(np.divide(times['theirs'], times['ours'])):.2f}x")
  print("| batch | image | GFLOP/img | dit_jax img/s | torch-fidelity img/s | ratio (ours/theirs) | dit_jax MFU | "
        "torch-fidelity MFU | dit_jax compile s | rel err pool3 | load (1 min) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  total = flops * args.batch
  print(f"| {args.batch} | {args.size}x{args.size} | {flops / 1e9:.2f} | {args.batch / ours_s:.2f} | "
        f"{args.batch / theirs_s:.2f} | {theirs_s / ours_s:.2f}x | {total / ours_s / peak['jax']:.1%} | "
        f"{total / theirs_s / peak['torch']:.1%} | {compile_s:.1f} | {err['pool3']:.1e} | "
        f"{min(load):.1f}–{max(load):.1f} |")


if __name__ == "__main__":
  main()
