"""Helpers shared by the side-by-side benchmarks: timing, matmul peak, DiT FLOPs, a (diffusers, dit_jax) pair."""
from __future__ import annotations

import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dit_jax.convert import dit_tables  # noqa: E402
from dit_jax.convert.readers import to_numpy  # noqa: E402
from dit_jax.models.dit import DiTConfig, dit_config, flops_per_image  # noqa: E402


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
  return flops_per_image(cfg)


def diffusers_dit(cfg: DiTConfig):
  """diffusers' DiTTransformer2DModel of ``cfg``'s shape (32x32x4 latents), random weights, in eval mode."""
  from diffusers import DiTTransformer2DModel

  return DiTTransformer2DModel(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
                               in_channels=4, out_channels=cfg.out_channels, num_layers=cfg.depth, sample_size=32,
                               patch_size=cfg.patch_size, num_embeds_ada_norm=1000).eval()


def build_pair(name: str, learn_sigma: bool = True):
  cfg = dit_config(name, convention="diffusers", learn_sigma=learn_sigma)
  ref = diffusers_dit(cfg)
  tensors = {k: to_numpy(v) for k, v in ref.state_dict().items()}
  first = "transformer_blocks.0.norm1.emb."
  for k in tensors:  # tie the per-block embedder copies, as in every converted DiT
    if ".norm1.emb." in k:
      tensors[k] = tensors[first + k.split(".norm1.emb.", 1)[1]]
  ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()})
  return cfg, ref, dit_tables.to_model(tensors, cfg, "diffusers")


def published_peak() -> float | None:
  """The published bf16 peak FLOP/s of JAX's first device on a GPU / TPU that dit_jax.hardware lists, else None."""
  from dit_jax import hardware

  chip = hardware.chip_of(jax.devices()[0]) if jax.default_backend() != "cpu" else None
  if chip:
    print(f"# MFU against the published bf16 peak of {chip.name}: {chip.bf16_flops / 1e12:.0f} TFLOP/s")
  return chip.bf16_flops if chip else None


def start_run() -> float:
  """Use every core in torch, measure the matmul peaks, print the machine / software / peak header lines, and
  return the MFU denominator: the chip's published peak on a known GPU / TPU, else the higher measured peak."""
  import os
  import platform

  torch.set_num_threads(os.cpu_count() or 1)
  peaks = matmul_peak_flops()
  print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__}")
  print(f"# fp32 matmul peak (2048^2): jax {peaks['jax'] / 1e9:.1f} GFLOP/s, torch {peaks['torch'] / 1e9:.1f} GFLOP/s")
  return published_peak() or max(peaks.values())
