#!/usr/bin/env python
"""DiT sampling throughput: dit_jax's jitted DDIM loop vs diffusers' DiTPipeline loop, side by side in one run.

Same random DiT weights, same initial latents, 50 DDIM steps with classifier-free guidance (scale 4, the batch is
doubled), 32x32x4 latents. The VAE decode is excluded on both sides (the pipeline's decode is stubbed), so this
times the denoising loop only. Also reports the final-latent agreement of the two runs.

  python bench/sample.py [--model DiT-S/2] [--batch 4] [--steps 50]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np
import torch

from common import build_pair, forward_flops, matmul_peak_flops, published_peak


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="DiT-S/2")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--cfg-scale", type=float, default=4.0)
  args = p.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)

  from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline
  from diffusers.pipelines.dit import pipeline_dit

  from dit_jax.diffusion.samplers import sample

  cfg, ref, ours = build_pair(args.model)
  rng = np.random.default_rng(0)
  x_T = rng.standard_normal((args.batch, 32, 32, 4)).astype(np.float32)
  labels = rng.integers(0, 1000, args.batch)

  kw = dict(method="ddim", respacing=f"ddim{args.steps}", cfg_scale=args.cfg_scale, noise=x_T)
  start = time.perf_counter()
  sample(ours, labels, **kw).block_until_ready()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  latents = np.asarray(sample(ours, labels, **kw).block_until_ready())
  jax_s = time.perf_counter() - start

  pipeline_dit.randn_tensor = lambda *a, **k: torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())
  vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, layers_per_block=1)
  captured = {}

  def capture(z, *a, **k):
    captured["z"] = z * vae.config.scaling_factor
    return type("Out", (), {"sample": torch.zeros(z.shape[0], 3, 8, 8)})()

  vae.decode = capture
  pipe = DiTPipeline(transformer=ref, vae=vae, scheduler=DDIMScheduler(beta_schedule="linear", clip_sample=False))
  pipe.set_progress_bar_config(disable=True)
  with torch.inference_mode():
    start = time.perf_counter()
    pipe(class_labels=labels.tolist(), guidance_scale=args.cfg_scale, num_inference_steps=args.steps, output_type="np")
    torch_s = time.perf_counter() - start
  ref_latents = captured["z"].numpy().transpose(0, 2, 3, 1)
  err = float(np.abs(latents - ref_latents).max() / np.abs(ref_latents).max())

  peak = published_peak() or max(matmul_peak_flops().values())
  flops = forward_flops(cfg) * 2 * args.batch * args.steps  # CFG doubles the batch
  print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__}; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
  print("| model | batch | steps | dit_jax img/s | DiTPipeline img/s | ratio (ours/theirs) | dit_jax MFU | "
        "pipeline MFU | dit_jax compile s | final-latent rel err |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  print(f"| {args.model} | {args.batch} | {args.steps} | {args.batch / jax_s:.3f} | {args.batch / torch_s:.3f} | "
        f"{torch_s / jax_s:.2f}x | {flops / jax_s / peak:.1%} | {flops / torch_s / peak:.1%} | {compile_s - jax_s:.1f} | "
        f"{err:.1e} |")


if __name__ == "__main__":
  main()
