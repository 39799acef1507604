#!/usr/bin/env python
"""DiT-XL/2 bf16 on one GPU: forward, a 50-step DDIM sampling loop (CFG, the batch doubled) and a train step (flow
objective, AdamW), each with dit_jax's attention "cudnn" and "xla", against diffusers' DiTTransformer2DModel on the
same GPU (bf16, SDPA attention; the train step under bf16 autocast with fp32 weights, as ours). Prints one table:
img/s of each side, the ratio (ours / torch) and our MFU against the chip's published bf16 peak (dit_jax.hardware).

  python bench/gpu.py [--model DiT-XL/2] [--impls cudnn,xla] [--dry-run]

--dry-run: DiT-S/2, batch 2, one iteration, 2 sampling steps, "xla" only, on whatever device there is (a CPU check
that the whole script works). Run through bench/gpu.sh, which sets the GPU memory sharing between JAX and torch.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import diffusers_dit, forward_flops  # noqa: E402

WHAT = ("forward", "sample", "train")


def timed(fn, iters: int, sync) -> float:
  """Median seconds of ``fn`` after one warm-up call (compilation), ``sync`` ending each timing."""
  fn()
  sync()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    sync()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def torch_seconds(cfg, what: str, batch: int, steps: int, iters: int, device: str) -> float:
  """Seconds per call of diffusers' DiT doing ``what`` in bf16 on ``device``."""
  from diffusers.utils import logging as diffusers_logging

  diffusers_logging.set_verbosity_error()  # not the note on casting a model with .to(bfloat16)
  ref = diffusers_dit(cfg).to(device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  x = torch.randn(batch, cfg.in_channels, 32, 32, device=device)
  y = torch.randint(0, 1000, (batch,), device=device)
  if what == "train":
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4)

    def step():
      s = torch.rand(batch, device=device)[:, None, None, None]
      noise = torch.randn_like(x)
      with torch.autocast(device, dtype=torch.bfloat16):
        pred = ref((1 - s) * x + s * noise, 1000 * s.flatten(), y).sample
      loss = torch.mean((pred.float() - (noise - x)) ** 2)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()

    return timed(step, iters, sync)
  ref = ref.to(torch.bfloat16).eval()
  with torch.inference_mode():
    if what == "forward":
      t = torch.randint(0, 1000, (batch,), device=device)
      return timed(lambda: ref(x.bfloat16(), t, y), iters, sync)
    return timed(lambda: _torch_sample(ref, batch, steps, device), iters, sync)


def _torch_sample(ref, batch: int, steps: int, device: str):
  """DiTPipeline's loop: DDIM, CFG 4 on a doubled batch (the VAE decode left out)."""
  from diffusers import DDIMScheduler

  sched = DDIMScheduler(beta_schedule="linear", clip_sample=False)
  sched.set_timesteps(steps)
  z = torch.randn(batch, 4, 32, 32, device=device, dtype=torch.bfloat16)
  labels = torch.cat([torch.randint(0, 1000, (batch,), device=device), torch.full((batch,), 1000, device=device)])
  for t in sched.timesteps:
    out = ref(torch.cat([z, z]), t.to(device).expand(2 * batch), labels).sample
    eps, _ = out.split(4, dim=1)
    cond, uncond = eps.chunk(2)
    z = sched.step(uncond + 4.0 * (cond - uncond), t, z).prev_sample
  return z


def jax_seconds(name: str, cfg, what: str, impl: str, batch: int, steps: int, iters: int) -> float:
  """Seconds per call of dit_jax doing ``what`` in bf16 with attention ``impl``."""
  from flax import nnx

  from dit_jax import DiT
  from dit_jax.diffusion.samplers import sample

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, 32, 32, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 1000, batch))
  if what == "train":
    return _jax_train_seconds(name, impl, batch, iters, {"image": np.asarray(x), "label": np.asarray(y)})
  model = DiT(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention_impl=impl)
  out = {}
  if what == "forward":
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y))
    t = jnp.asarray(rng.integers(0, 1000, batch), jnp.float32)
    call = lambda: out.update(r=fwd(state, x.astype(jnp.bfloat16), t, y))
  else:
    call = lambda: out.update(r=sample(model, y, method="ddim", respacing=f"ddim{steps}", cfg_scale=4.0, noise=x))
  sync = lambda: jax.block_until_ready(out["r"])
  return timed(call, iters, sync)


def _jax_train_seconds(name: str, impl: str, batch: int, iters: int, data: dict) -> float:
  from dit_jax import parallel
  from dit_jax.train_config import default_config
  from dit_jax.trainer import Trainer

  config = default_config()
  config.global_batch_size = batch
  config.model.update(name=name, learn_sigma=False)
  config.update(objective="flow", compute_dtype="bfloat16", attention_impl=impl, total_steps=10**6)
  trainer = Trainer(config, parallel.make_mesh((1, 1, 1), jax.devices()[:1]))
  holder = dict(zip(("state", "rest"), trainer.init()))

  def step():
    holder["state"], holder["metrics"] = trainer.step(holder["state"], holder["rest"], data)

  return timed(step, iters, lambda: jax.block_until_ready(holder["metrics"]["loss"]))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="DiT-XL/2")
  p.add_argument("--impls", default="cudnn,xla", help="dit_jax attention implementations")
  p.add_argument("--batch", default="forward=64,sample=16,train=32", help="per WHAT (sample: before CFG doubling)")
  p.add_argument("--iters", default="forward=20,sample=3,train=10")
  p.add_argument("--steps", type=int, default=50, help="sampling steps")
  p.add_argument("--dry-run", action="store_true", help="DiT-S/2, batch 2, 1 iteration, 2 steps, xla: a CPU check")
  a = p.parse_args()
  if a.dry_run:
    a.model, a.impls, a.steps = "DiT-S/2", "xla", 2
    a.batch, a.iters = "forward=2,sample=2,train=2", "forward=1,sample=1,train=1"
  batch, iters = (dict((kv.split("=")[0], int(kv.split("=")[1])) for kv in s.split(",")) for s in (a.batch, a.iters))
  run(a.model, a.impls.split(","), batch, iters, a.steps)


def run(name: str, impls: list[str], batch: dict, iters: dict, steps: int) -> None:
  from dit_jax import hardware
  from dit_jax.models.dit import dit_config

  device = jax.devices()[0]
  chip = hardware.chip_of(device) if device.platform != "cpu" else None
  torch_device = "cuda" if torch.cuda.is_available() else "cpu"
  print(f"# {time.strftime('%Y-%m-%d')} {device.device_kind}, jax {jax.__version__}, torch {torch.__version__} "
        f"({torch_device}); MFU against {f'{chip.name} {chip.bf16_flops / 1e12:.0f} TFLOP/s bf16' if chip else '-'}",
        flush=True)
  print("| model | what | impl | batch | dit_jax img/s | torch img/s | ratio | dit_jax MFU |")
  print("|---|---|---|---|---|---|---|---|", flush=True)
  for what in WHAT:
    cfg = dit_config(name, convention="diffusers", learn_sigma=what != "train")
    b, n = batch[what], iters[what]
    torch_s = torch_seconds(cfg, what, b, steps, n, torch_device)
    if torch_device == "cuda":
      torch.cuda.empty_cache()
    flops = forward_flops(cfg) * b * {"forward": 1, "sample": 2 * steps, "train": 3}[what]
    for impl in impls:
      ours = jax_seconds(name, cfg, what, impl, b, steps, n)
      mfu = f"{flops / ours / chip.bf16_flops:.1%}" if chip else "-"
      print(f"| {name} | {what}{f' ({steps} steps)' if what == 'sample' else ''} | {impl} | {b} | {b / ours:.2f} | "
            f"{b / torch_s:.2f} | {torch_s / ours:.2f}x | {mfu} |", flush=True)


if __name__ == "__main__":
  main()
