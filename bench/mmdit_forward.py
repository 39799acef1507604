#!/usr/bin/env python
"""MMDiT forward throughput: dit_jax (jitted) vs diffusers' SD3Transformer2DModel, side by side in one run.

The model is SD3.5-Medium-shaped but small enough for a CPU: QK RMSNorm, MMDiT-X dual attention in the first half
of the layers, 64-wide heads, the real text widths (4096-wide context of 77 + 77 tokens, 2048-wide pooled vector)
and 32x32x16 latents (256 px). Both models hold the same random weights (ours converted from the diffusers state
dict). Prints samples/s for each, the ratio, each one's fraction of the fp32 matmul peak measured in this run, and
the relative max-abs difference of the outputs.

  python bench/mmdit_forward.py [--depth 8] [--heads 6] [--batch 2] [--iters 10]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch

from common import median_seconds, start_run


def build_pair(depth: int, heads: int):
  from diffusers import SD3Transformer2DModel

  from dit_jax.convert import mmdit_tables
  from dit_jax.convert.readers import to_numpy

  ref = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=depth, attention_head_dim=64,
                              num_attention_heads=heads, joint_attention_dim=4096, caption_projection_dim=64 * heads,
                              pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=96, qk_norm="rms_norm",
                              dual_attention_layers=tuple(range(depth // 2))).eval()
  tensors = {k: to_numpy(v) for k, v in ref.state_dict().items()}
  cfg = mmdit_tables.infer_config(tensors, "diffusers", dict(ref.config))
  return cfg, ref, mmdit_tables.to_model(tensors, cfg, "diffusers")


def bench(depth: int, heads: int, batch: int, context_len: int, iters: int, peak: float) -> dict:
  from flax import nnx

  from dit_jax.models.mmdit import flops_per_sample

  cfg, ref, ours = build_pair(depth, heads)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, 32, 32, 16)).astype(np.float32)
  t = rng.uniform(0, 1000, batch).astype(np.float32)
  ctx = rng.standard_normal((batch, context_len, 4096)).astype(np.float32)
  pooled = rng.standard_normal((batch, 2048)).astype(np.float32)

  graphdef, state = nnx.split(ours)
  fwd = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
  args = [jnp.asarray(a) for a in (x, t, ctx, pooled)]
  jax_s = median_seconds(lambda: fwd(state, *args).block_until_ready(), iters)

  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  targs = dict(hidden_states=xt, encoder_hidden_states=torch.from_numpy(ctx), pooled_projections=torch.from_numpy(pooled),
               timestep=torch.from_numpy(t))
  with torch.inference_mode():
    torch_s = median_seconds(lambda: ref(**targs), iters)
    ref_out = ref(**targs).sample.numpy().transpose(0, 2, 3, 1)
  out = np.asarray(fwd(state, *args))
  err = float(np.abs(out - ref_out).max() / np.abs(ref_out).max())
  per_sample = flops_per_sample(cfg, 32, 32, context_len)
  return dict(depth=depth, hidden=cfg.hidden_size, batch=batch, jax_sps=batch / jax_s, torch_sps=batch / torch_s,
              ratio=torch_s / jax_s, jax_mfu=per_sample * batch / jax_s / peak,
              torch_mfu=per_sample * batch / torch_s / peak, gflops=per_sample / 1e9, rel_err=err)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--depth", type=int, default=8)
  p.add_argument("--heads", type=int, default=6)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--context-len", type=int, default=154)
  p.add_argument("--iters", type=int, default=10)
  args = p.parse_args()
  peak = start_run()
  print("| depth | hidden | batch | GFLOP/sample | dit_jax samples/s | diffusers samples/s | ratio (ours/theirs) | "
        "dit_jax MFU | diffusers MFU | rel err |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  r = bench(args.depth, args.heads, args.batch, args.context_len, args.iters, peak)
  print(f"| {r['depth']} | {r['hidden']} | {r['batch']} | {r['gflops']:.2f} | {r['jax_sps']:.2f} | "
        f"{r['torch_sps']:.2f} | {r['ratio']:.2f}x | {r['jax_mfu']:.1%} | {r['torch_mfu']:.1%} | {r['rel_err']:.1e} |")


if __name__ == "__main__":
  main()
