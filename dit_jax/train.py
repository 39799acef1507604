"""The training loop: ``train(config, workdir)`` trains (or resumes) with clu metrics, MFU, a non-finite guard,
SIGTERM handling (save, then exit), periodic orbax checkpoints and EMA sample grids.

Kinds: ``model.kind`` names a registered kind (:mod:`dit_jax.kinds`), e.g. 'dit' (a class-conditional DiT on
{"image", "label"} batches) or 'mmdit' (an SD3-style MMDiT on {"image", "context", "pooled"}); the step is
:class:`dit_jax.trainer.Trainer`. Randomness of step s is ``fold_in(key(seed), s)`` and the input position is
checkpointed, so a resumed run computes exactly what an uninterrupted one would.
"""
from __future__ import annotations

import json
import logging
import pathlib
import signal
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metric_writers, periodic_actions
from flax import nnx

from dit_jax import data, kinds, parallel, sample_files
from dit_jax.checkpoint import Checkpoints
from dit_jax.diffusion.samplers import sample
from dit_jax.train_config import validate
from dit_jax.trainer import Trainer, TrainState
from dit_jax.workdir import write_model_meta

logger = logging.getLogger("dit_jax")


class TrainingError(RuntimeError):
  """Training cannot continue (e.g. too many consecutive non-finite updates); the message is one line."""


def measured_peak_flops(dtype=jnp.float32, n: int = 2048) -> float:
  """Achieved matmul FLOP/s of one device, for MFU (device-count times this is the mesh's peak)."""
  a = jax.device_put(jnp.ones((n, n), dtype), jax.devices()[0])
  dot = jax.jit(jnp.dot)
  dot(a, a).block_until_ready()
  start = time.perf_counter()
  for _ in range(3):
    dot(a, a).block_until_ready()
  return 3 * 2 * n**3 / (time.perf_counter() - start)


class _Sigterm:
  def __init__(self):
    self.received = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, *_):
    logger.warning("SIGTERM: saving a checkpoint and exiting")
    self.received = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, loader: Iterator | None = None,
          mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """Train (or resume) in ``workdir``; returns the final train state.

  Args:
    loader: an iterator of host-local batches with get_state()/set_state() (default: dit_jax.data.make_loader).
    mesh: default: ``parallel.make_mesh(config.mesh_shape)`` over all devices.
  """
  validate(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = mesh or parallel.make_mesh(tuple(config.mesh_shape))
  trainer = Trainer(config, mesh)
  kind = kinds.get(config.model.kind)
  if loader is None:
    loader = data.make_loader(config.data, global_batch_size=config.global_batch_size, seed=config.seed,
                              process_index=jax.process_index(), process_count=jax.process_count(),
                              **kind.loader_kwargs(config))
  ckpts = Checkpoints(workdir, config)
  start = ckpts.latest_step()
  if start is None:
    state, rest = trainer.init()
    start = 0
    if jax.process_index() == 0:
      write_model_meta(workdir, config, trainer.model_config, kind.conditioning_meta(config, loader))
  else:
    state, rest, extra = ckpts.restore(start, *trainer.abstract_state())
    loader.set_state(extra["data"])
    logger.info("resumed from step %d in %s", start, workdir)

  is_main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(str(workdir), just_logging=not is_main)
  progress = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer)
  flops_per_step = None
  peak = measured_peak_flops(jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32) * mesh.size
  jsonl = (workdir / "metrics.jsonl").open("a") if is_main else None
  sigterm = _Sigterm()
  last_time, last_step = time.perf_counter(), start
  try:
    for step in range(start + 1, config.total_steps + 1):
      batch = next(loader)
      if flops_per_step is None:
        flops_per_step = 3 * kind.flops(trainer.model_config, batch) * config.global_batch_size
      state, metrics = trainer.step(state, rest, batch)
      progress(step)
      run = int(metrics["nonfinite_run"])
      if run:
        logger.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", step, run)
      if step % config.log_every_steps == 0 or step == config.total_steps or run >= config.nonfinite_abort_after:
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        steps_per_s = (step - last_step) / (now - last_time)
        last_time, last_step = now, step
        scalars.update(steps_per_s=steps_per_s, examples_per_s=steps_per_s * config.global_batch_size,
                       mfu=steps_per_s * flops_per_step / peak, skipped_images=getattr(loader, "skipped", 0))
        writer.write_scalars(step, scalars)
        if jsonl:
          jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
          jsonl.flush()
      if run >= config.nonfinite_abort_after:
        raise TrainingError(f"{run} consecutive non-finite updates at step {step}; stopping (the last checkpoint "
                            "holds finite parameters)")
      if step % config.checkpoint_every_steps == 0 or step == config.total_steps or sigterm.received:
        ckpts.save(step, state, rest, {"data": loader.get_state(), "step": step})
      if config.sample_every_steps and step % config.sample_every_steps == 0:
        write_sample_grid(config, trainer.ema_model(state, rest), workdir, step, writer)
      if sigterm.received:
        break
  finally:
    sigterm.restore()
    ckpts.wait()
    ckpts.close()
    writer.flush()
    if jsonl:
      jsonl.close()
  return state


def write_sample_grid(config: ml_collections.ConfigDict, model: nnx.Module, workdir: pathlib.Path, step: int,
                      writer) -> np.ndarray:
  """A grid of EMA samples (conditioned as the kind's ``grid_cond``: labels 0, 1, ..., or class tokens / text rows
  0, 1, ... for an MMDiT) as an image summary and ``<workdir>/samples/<step>.png``."""
  s = config.sample
  cond = kinds.get(config.model.kind).grid_cond(config, model, s.num)
  latents = sample(model, cond, jax.random.key(config.seed), method=s.method, steps=s.steps, cfg_scale=s.cfg_scale,
                   cfg_mode=s.cfg_mode, flow_convention=config.flow.convention, shift=config.flow.shift)
  grid = sample_files.image_grid(sample_files.displayable(sample_files.to_uint8(jax.device_get(latents))))
  writer.write_images(step, {"samples": grid[None]})
  if jax.process_index() == 0:
    (workdir / "samples").mkdir(exist_ok=True)
    sample_files.save_png(workdir / "samples" / f"{step:07d}.png", grid)
  return grid
