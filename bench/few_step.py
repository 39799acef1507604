#!/usr/bin/env python
"""Few-step student vs CFG teacher: images/s of a LADD-style student at 4 steps (4 model calls) and of its teacher
at 32 Euler steps with classifier-free guidance (32 calls on a doubled batch), each in dit_jax and in a PyTorch
loop over diffusers' DiTTransformer2DModel, side by side in one run.

The speed of a sampler does not depend on what the weights learned, so both roles use one random rectified-flow
DiT (same weights on both sides; the 'sd3' convention: timestep 1000 sigma, velocity = noise - data). The teacher
runs diffusers' FlowMatchEulerDiscreteScheduler; the student runs LADD's sampler (x̂0 at sigmas 1, .75, .5, .25,
renoised with given noise), written out in torch. Each row also reports the final-latent agreement of the two sides.
The trained digits models of the demo are timed by ``tools/distill_demo.py`` (images/s column of its table).

  python bench/few_step.py [--model DiT-S/2] [--batch 4] [--iters 2]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from common import build_pair, forward_flops, median_seconds, start_run


def torch_teacher(ref, x_T, labels, steps, scale):
  """32-step Euler with CFG through diffusers' flow-matching scheduler."""
  from diffusers import FlowMatchEulerDiscreteScheduler

  sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
  sched.set_timesteps(steps)
  x = torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())
  y = torch.from_numpy(labels)
  null = torch.full_like(y, 1000)
  with torch.inference_mode():
    for t in sched.timesteps:
      cond, uncond = ref(torch.cat([x, x]), t.expand(2 * len(y)), torch.cat([y, null])).sample.chunk(2)
      x = sched.step(uncond + scale * (cond - uncond), t, x).prev_sample
  return x.numpy().transpose(0, 2, 3, 1)


def torch_student(ref, x_T, labels, sigmas, step_noise):
  """LADD's sampler: x̂0 = x - s v at each sigma, renoised to the next one with the given noise."""
  x = torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())
  y = torch.from_numpy(labels)
  with torch.inference_mode():
    for k, s in enumerate(sigmas[:-1]):
      x0 = x - s * ref(x, torch.full((len(y),), 1000 * s), y).sample
      n = torch.from_numpy(step_noise[k].transpose(0, 3, 1, 2).copy())
      x = (1 - sigmas[k + 1]) * x0 + sigmas[k + 1] * n if k + 1 < len(sigmas) - 1 else x0
  return x.numpy().transpose(0, 2, 3, 1)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="DiT-S/2")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--teacher-steps", type=int, default=32)
  p.add_argument("--student-steps", type=int, default=4)
  p.add_argument("--cfg-scale", type=float, default=2.0)
  p.add_argument("--iters", type=int, default=2)
  args = p.parse_args()
  peak = start_run()

  from dit_jax.diffusion.samplers import few_step_sigmas, sample

  cfg, ref, ours = build_pair(args.model, learn_sigma=False)
  rng = np.random.default_rng(0)
  x_T = rng.standard_normal((args.batch, 32, 32, 4)).astype(np.float32)
  step_noise = rng.standard_normal((args.student_steps, args.batch, 32, 32, 4)).astype(np.float32)
  labels = rng.integers(0, 1000, args.batch)
  sigmas = few_step_sigmas(args.student_steps).tolist()
  kw = dict(flow_convention="sd3", shift=1.0, noise=x_T)
  rows = [
      (f"teacher, Euler {args.teacher_steps} steps, CFG {args.cfg_scale}", 2 * args.teacher_steps,
       lambda: np.asarray(sample(ours, labels, method="euler", steps=args.teacher_steps, cfg_scale=args.cfg_scale,
                                 **kw)),
       lambda: torch_teacher(ref, x_T, labels, args.teacher_steps, args.cfg_scale)),
      (f"student, few-step {args.student_steps} steps", args.student_steps,
       lambda: np.asarray(sample(ours, labels, method="few_step", steps=args.student_steps, step_noise=step_noise,
                                 **kw)),
       lambda: torch_student(ref, x_T, labels, sigmas, step_noise)),
  ]
  print(f"# {args.model}, batch {args.batch}, 32x32x4 latents, random weights, fp32, median of {args.iters}")
  print("| sampler | model calls / image | dit_jax img/s | PyTorch img/s | ratio (ours/theirs) | dit_jax MFU | "
        "final-latent rel err |")
  print("|---|---|---|---|---|---|---|")
  speeds = []
  for name, calls, jax_fn, torch_fn in rows:
    out = {}
    jax_s = median_seconds(lambda: out.update(a=jax_fn()), args.iters, warmup=1)  # the warm-up compiles
    torch_s = median_seconds(lambda: out.update(b=torch_fn()), args.iters, warmup=0)
    a, b = out["a"], out["b"]
    err = float(np.abs(a - b).max() / np.abs(b).max())
    mfu = forward_flops(cfg) * calls * args.batch / jax_s / peak
    speeds.append(args.batch / jax_s)
    print(f"| {name} | {calls} | {args.batch / jax_s:.3f} | {args.batch / torch_s:.3f} | {torch_s / jax_s:.2f}x | "
          f"{mfu:.1%} | {err:.1e} |")
  print(f"# student / teacher images/s in dit_jax: {speeds[1] / speeds[0]:.1f}x "
        f"({2 * args.teacher_steps} vs {args.student_steps} model calls per image)")


if __name__ == "__main__":
  main()
