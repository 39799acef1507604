#!/usr/bin/env python
"""DiT forward throughput: dit_jax (jitted) vs diffusers' DiTTransformer2DModel, side by side in one run.

Both models hold the same random weights (ours converted from the diffusers state dict), see the same batch of
32x32x4 latents, and run on the same machine. Prints images/s for each, the ratio, and each one's fraction of the
fp32 matmul peak measured in this run (the faster of a jitted jnp.dot and torch.mm on 2048^2 matrices).

  python bench/forward.py [--models DiT-S/2,DiT-B/2] [--batch 8] [--iters 10]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch

from common import build_pair, forward_flops, median_seconds, start_run


def bench(name: str, batch: int, iters: int, peak: float) -> dict:
  from flax import nnx

  cfg, ref, ours = build_pair(name)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, 32, 32, 4)).astype(np.float32)
  t = rng.integers(0, 1000, batch).astype(np.float32)
  y = rng.integers(0, 1000, batch)

  graphdef, state = nnx.split(ours)
  fwd = jax.jit(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y))
  xj, tj, yj = jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)
  jax_s = median_seconds(lambda: fwd(state, xj, tj, yj).block_until_ready(), iters)

  xt, tt, yt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t), torch.from_numpy(y)
  with torch.inference_mode():
    torch_s = median_seconds(lambda: ref(xt, tt, yt), iters)
    ref_out = ref(xt, tt, yt).sample.numpy().transpose(0, 2, 3, 1)
  out = np.asarray(fwd(state, xj, tj, yj))
  err = float(np.abs(out - ref_out).max() / np.abs(ref_out).max())
  flops = forward_flops(cfg) * batch
  return dict(model=name, batch=batch, jax_ips=batch / jax_s, torch_ips=batch / torch_s, ratio=torch_s / jax_s,
              jax_mfu=flops / jax_s / peak, torch_mfu=flops / torch_s / peak, gflops=forward_flops(cfg) / 1e9,
              rel_err=err)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="DiT-S/2,DiT-B/2")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--iters", type=int, default=10)
  args = p.parse_args()
  peak = start_run()
  print("| model | batch | GFLOP/img | dit_jax img/s | diffusers img/s | ratio (ours/theirs) | dit_jax MFU | "
        "diffusers MFU | rel err |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name in args.models.split(","):
    r = bench(name.strip(), args.batch, args.iters, peak)
    print(f"| {r['model']} | {r['batch']} | {r['gflops']:.2f} | {r['jax_ips']:.2f} | {r['torch_ips']:.2f} | "
          f"{r['ratio']:.2f}x | {r['jax_mfu']:.1%} | {r['torch_mfu']:.1%} | {r['rel_err']:.1e} |", flush=True)


if __name__ == "__main__":
  main()
