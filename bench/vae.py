#!/usr/bin/env python
"""VAE decode throughput: dit_jax's jitted AutoencoderKL.decode vs diffusers' AutoencoderKL.decode, side by side.

Both hold the same random weights in the SD ``sd-vae-ft-ema`` architecture (4 latent channels, 8x upsampling,
83.7M parameters), decode the same batch of latents, fp32 on this machine. Prints images/s, the ratio and the
relative difference of the two outputs.

  python bench/vae.py [--latent 32] [--batch 2] [--iters 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np
import torch

from common import median_seconds  # also puts the repository root on sys.path


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--latent", type=int, default=32, help="latent side (32 -> 256x256 images)")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--iters", type=int, default=3)
  args = p.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  from diffusers import AutoencoderKL
  from flax import nnx

  from dit_jax.convert import vae_tables
  from dit_jax.convert.readers import to_numpy

  ref = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).eval()
  tensors = {k: to_numpy(v) for k, v in ref.state_dict().items()}
  cfg = vae_tables.infer_config(tensors, "diffusers", dict(ref.config))
  ours = vae_tables.to_model(tensors, cfg, "diffusers")
  z = np.random.default_rng(0).standard_normal((args.batch, args.latent, args.latent, 4)).astype(np.float32)

  graphdef, state = nnx.split(ours)
  decode = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))
  zj = jax.numpy.asarray(z)
  jax_s = median_seconds(lambda: decode(state, zj).block_until_ready(), args.iters, warmup=1)
  zt = torch.from_numpy(z.transpose(0, 3, 1, 2).copy())
  with torch.inference_mode():
    torch_s = median_seconds(lambda: ref.decode(zt), args.iters, warmup=1)
    ref_out = ref.decode(zt).sample.numpy().transpose(0, 2, 3, 1)
  err = float(np.abs(np.asarray(decode(state, zj)) - ref_out).max() / np.abs(ref_out).max())
  side = args.latent * cfg.downsample_factor
  print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__}")
  print("| VAE decode | batch | image | dit_jax img/s | diffusers img/s | ratio (ours/theirs) | rel err |")
  print("|---|---|---|---|---|---|---|")
  print(f"| sd-vae (83.7M) | {args.batch} | {side}x{side} | {args.batch / jax_s:.3f} | {args.batch / torch_s:.3f} | "
        f"{torch_s / jax_s:.2f}x | {err:.1e} |")


if __name__ == "__main__":
  main()
