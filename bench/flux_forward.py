#!/usr/bin/env python
"""FLUX.1 forward throughput: dit_jax (jitted) vs diffusers' FluxTransformer2DModel, side by side in one run.

A FLUX.1 [dev]-shaped model reduced in depth and width for a CPU: 128-wide heads with the real rotary split
(16, 56, 56), QK RMSNorm, the guidance embedder, double- then single-stream blocks, the real text widths (T5
context of 512 tokens x 4096, CLIP pooled 768) and 32x32x16 latents (256 px, 256 packed image tokens). Both models
hold the same random weights (ours converted from the diffusers state dict by dit_jax.convert.flux_tables). The
diffusers side is timed on latents already packed, with FluxPipeline's ids; ours packs inside. Prints samples/s
for each, the ratio, each one's fraction of the fp32 matmul peak measured in this run, and the relative max-abs
difference of the outputs.

  python bench/flux_forward.py [--double 2] [--single 4] [--heads 4] [--batch 2] [--context-len 512] [--iters 10]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch

from common import median_seconds, start_run

LATENT = 32  # latent pixels per side (16 channels): 256 px, 256 tokens


def build_pair(double: int, single: int, heads: int):
  from diffusers import FluxTransformer2DModel

  from dit_jax.convert import flux_tables
  from dit_jax.convert.readers import to_numpy

  torch.manual_seed(0)
  ref = FluxTransformer2DModel(in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
                               num_attention_heads=heads, joint_attention_dim=4096, pooled_projection_dim=768,
                               guidance_embeds=True, axes_dims_rope=(16, 56, 56)).eval()
  tensors = {k: to_numpy(v) for k, v in ref.state_dict().items()}
  cfg = flux_tables.infer_config(tensors, "diffusers", dict(ref.config))
  return cfg, ref, flux_tables.to_model(tensors, cfg, "diffusers")


def bench(double: int, single: int, heads: int, batch: int, context_len: int, iters: int, peak: float) -> dict:
  from diffusers import FluxPipeline
  from flax import nnx

  from dit_jax.models.flux import flops_per_sample

  cfg, ref, ours = build_pair(double, single, heads)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, LATENT, LATENT, 16)).astype(np.float32)
  t = rng.uniform(0, 1, batch).astype(np.float32)  # sigma: both models multiply by 1000 inside
  g = np.full((batch,), 3.5, np.float32)
  ctx = rng.standard_normal((batch, context_len, 4096)).astype(np.float32)
  pooled = rng.standard_normal((batch, 768)).astype(np.float32)

  graphdef, state = nnx.split(ours)
  fwd = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
  args = [jnp.asarray(a) for a in (x, t, ctx, pooled, g)]
  jax_s = median_seconds(lambda: fwd(state, *args).block_until_ready(), iters)

  latents = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  packed = FluxPipeline._pack_latents(latents, batch, 16, LATENT, LATENT)
  targs = dict(hidden_states=packed, encoder_hidden_states=torch.from_numpy(ctx),
               pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t),
               guidance=torch.from_numpy(g), txt_ids=torch.zeros(context_len, 3),
               img_ids=FluxPipeline._prepare_latent_image_ids(batch, LATENT // 2, LATENT // 2, "cpu", torch.float32))
  with torch.inference_mode():
    torch_s = median_seconds(lambda: ref(**targs), iters)
    ref_out = FluxPipeline._unpack_latents(ref(**targs).sample, LATENT * 8, LATENT * 8, 8)
  ref_out = ref_out.numpy().transpose(0, 2, 3, 1)
  out = np.asarray(fwd(state, *args))
  err = float(np.abs(out - ref_out).max() / np.abs(ref_out).max())
  per_sample = flops_per_sample(cfg, LATENT, LATENT, context_len)
  return dict(depth=f"{double}+{single}", hidden=cfg.hidden_size, batch=batch, jax_sps=batch / jax_s,
              torch_sps=batch / torch_s, ratio=torch_s / jax_s, jax_mfu=per_sample * batch / jax_s / peak,
              torch_mfu=per_sample * batch / torch_s / peak, gflops=per_sample / 1e9, rel_err=err)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--double", type=int, default=2, help="double-stream blocks (FLUX.1: 19)")
  p.add_argument("--single", type=int, default=4, help="single-stream blocks (FLUX.1: 38)")
  p.add_argument("--heads", type=int, default=4, help="128-wide heads (FLUX.1: 24)")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--context-len", type=int, default=512)
  p.add_argument("--iters", type=int, default=10)
  args = p.parse_args()
  peak = start_run()
  print("| double+single | hidden | batch | GFLOP/sample | dit_jax samples/s | diffusers samples/s | "
        "ratio (ours/theirs) | dit_jax MFU | diffusers MFU | rel err |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  r = bench(args.double, args.single, args.heads, args.batch, args.context_len, args.iters, peak)
  print(f"| {r['depth']} | {r['hidden']} | {r['batch']} | {r['gflops']:.2f} | {r['jax_sps']:.2f} | "
        f"{r['torch_sps']:.2f} | {r['ratio']:.2f}x | {r['jax_mfu']:.1%} | {r['torch_mfu']:.1%} | {r['rel_err']:.1e} |")


if __name__ == "__main__":
  main()
