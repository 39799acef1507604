#!/usr/bin/env python
"""DiT forward throughput: dit_jax (jitted) vs diffusers' DiTTransformer2DModel, side by side in one run.

Both models hold the same random weights (ours converted from the diffusers state dict), see the same batch of
32x32x4 latents, and run on the same machine. Prints images/s for each, the ratio, and each one's fraction of the
fp32 matmul peak measured in this run (the faster of a jitted jnp.dot and torch.mm on 2048^2 matrices).

  python bench/forward.py [--models DiT-S/2,DiT-B/2] [--batch 8] [--iters 10]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dit_jax.convert import convert_state_dict  # noqa: E402
from dit_jax.convert.readers import to_numpy  # noqa: E402
from dit_jax.models.dit import DiTConfig, dit_config  # noqa: E402


def median_seconds(fn, iters: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def matmul_peak_flops(n: int = 2048, iters: int = 10) -> dict[str, float]:
  """Achieved fp32 FLOP/s of a large square matmul in each framework."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  jax_s = median_seconds(lambda: dot(a, a).block_until_ready(), iters)
  t = torch.randn(n, n)
  torch_s = median_seconds(lambda: torch.mm(t, t), iters)
  return {"jax": 2 * n**3 / jax_s, "torch": 2 * n**3 / torch_s}


def forward_flops(cfg: DiTConfig) -> float:
  """Forward FLOPs per image (2 x multiply-accumulates), the paper's Gflops formula."""
  t, d, p = cfg.num_tokens, cfg.hidden_size, cfg.patch_size
  hidden = int(cfg.mlp_ratio * d)
  block = 4 * t * d * d + 2 * t * d * hidden + 2 * t * t * d + 6 * d * d
  macs = cfg.depth * block + t * cfg.in_channels * p * p * d + 256 * d + d * d + 2 * d * d
  macs += t * d * p * p * cfg.out_channels
  return 2.0 * macs


def build_pair(name: str):
  from diffusers import DiTTransformer2DModel

  cfg = dit_config(name, convention="diffusers")
  ref = DiTTransformer2DModel(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
                              in_channels=4, out_channels=8, num_layers=cfg.depth, sample_size=32,
                              patch_size=cfg.patch_size, num_embeds_ada_norm=1000).eval()
  tensors = {k: to_numpy(v) for k, v in ref.state_dict().items()}
  first = "transformer_blocks.0.norm1.emb."
  for k in tensors:  # tie the per-block embedder copies, as in every converted DiT
    if ".norm1.emb." in k:
      tensors[k] = tensors[first + k.split(".norm1.emb.", 1)[1]]
  ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()})
  return cfg, ref, convert_state_dict(tensors, cfg, "diffusers")


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
  torch.set_num_threads(os.cpu_count() or 1)
  peaks = matmul_peak_flops()
  peak = max(peaks.values())
  print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__}")
  print(f"# fp32 matmul peak (2048^2): jax {peaks['jax'] / 1e9:.1f} GFLOP/s, torch {peaks['torch'] / 1e9:.1f} GFLOP/s")
  print("| model | batch | GFLOP/img | dit_jax img/s | diffusers img/s | ratio (ours/theirs) | dit_jax MFU | "
        "diffusers MFU | rel err |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name in args.models.split(","):
    r = bench(name.strip(), args.batch, args.iters, peak)
    print(f"| {r['model']} | {r['batch']} | {r['gflops']:.2f} | {r['jax_ips']:.2f} | {r['torch_ips']:.2f} | "
          f"{r['ratio']:.2f}x | {r['jax_mfu']:.1%} | {r['torch_mfu']:.1%} | {r['rel_err']:.1e} |", flush=True)


if __name__ == "__main__":
  main()
