#!/usr/bin/env python
"""DiT train step (forward + backward + AdamW): dit_jax's jitted, donated step vs a PyTorch step of diffusers'
DiTTransformer2DModel, side by side in one run.

Both sides use the same objective: rectified flow with uniform t (x_t = (1 - s) x0 + s eps, velocity MSE), AdamW
with lr 1e-4, label dropout 0.1, the same batch of 32x32x4 latents and the same initial weights. Prints steps/s,
the ratio and each side's MFU: 3 x forward FLOPs x batch per step over the fp32 matmul peak measured in this run.

  python bench/train_step.py [--models DiT-S/2,DiT-B/2] [--batch 8] [--iters 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np
import torch

from common import build_pair, forward_flops, matmul_peak_flops, published_peak, median_seconds


def bench(name: str, batch: int, iters: int, peak: float, dtype: str) -> dict:
  from dit_jax import parallel
  from dit_jax.train import Trainer
  from dit_jax.train_config import default_config

  cfg, ref, _ = build_pair(name, learn_sigma=False)
  config = default_config()
  config.global_batch_size = batch
  config.model.update(name=name, learn_sigma=False)
  config.objective = "flow"
  config.compute_dtype = dtype
  config.total_steps = 10**6
  trainer = Trainer(config, parallel.make_mesh((1, 1, 1), jax.devices()[:1]))
  state, rest = trainer.init()
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((batch, 32, 32, 4)).astype(np.float32)
  y = rng.integers(0, 1000, batch).astype(np.int32)
  data = {"image": x0, "label": y}
  holder = {"state": state}

  def jax_step():
    holder["state"], metrics = trainer.step(holder["state"], rest, data)
    jax.block_until_ready(metrics["loss"])

  jax_s = median_seconds(jax_step, iters)

  ref.train()
  opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
  xt0, yt = torch.from_numpy(x0.transpose(0, 3, 1, 2).copy()), torch.from_numpy(y).long()

  def torch_step():
    sigma = torch.rand(batch)
    noise = torch.randn_like(xt0)
    s = sigma[:, None, None, None]
    x_t = (1 - s) * xt0 + s * noise
    pred = ref(x_t, 1 - sigma, yt).sample
    loss = torch.mean((pred - (xt0 - noise)) ** 2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  torch_s = median_seconds(torch_step, iters)
  flops = 3 * forward_flops(cfg) * batch
  return dict(model=name, batch=batch, jax_sps=1 / jax_s, torch_sps=1 / torch_s, ratio=torch_s / jax_s,
              jax_mfu=flops / jax_s / peak, torch_mfu=flops / torch_s / peak)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="DiT-S/2,DiT-B/2")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dit_jax compute dtype")
  args = p.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  peaks = matmul_peak_flops()
  peak = published_peak() or max(peaks.values())
  print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__}; fp32 matmul peak: jax {peaks['jax'] / 1e9:.1f}, "
        f"torch {peaks['torch'] / 1e9:.1f} GFLOP/s")
  print("| model | batch | dit_jax steps/s | PyTorch steps/s | ratio (ours/theirs) | dit_jax MFU | PyTorch MFU |")
  print("|---|---|---|---|---|---|---|")
  for name in args.models.split(","):
    r = bench(name.strip(), args.batch, args.iters, peak, args.dtype)
    print(f"| {r['model']} | {r['batch']} | {r['jax_sps']:.3f} | {r['torch_sps']:.3f} | {r['ratio']:.2f}x | "
          f"{r['jax_mfu']:.1%} | {r['torch_mfu']:.1%} |", flush=True)


if __name__ == "__main__":
  main()
