"""The training loop: ``train(config, workdir)`` trains (or resumes) with metrics (metrics.jsonl, TensorBoard via
clu, one console line per log step through the "dit_jax" logger), MFU, a non-finite guard, SIGTERM handling (save,
then exit), periodic orbax checkpoints, EMA sample grids and FID / IS of the EMA model (``eval_every_steps``,
:mod:`dit_jax.eval.loop`; own lines in metrics.jsonl, e.g. {"step": 5000, "FID-10K": ..., "IS-10K": ...}).

The host reads device values only at log, checkpoint and sample steps, so dispatch runs ahead in between; the
non-finite guard stays exact (the step turns into a no-op on device once the limit is reached, see
:mod:`dit_jax.trainer`) and is checked before any save.

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
from clu import metric_writers
from flax import nnx

from dit_jax import data, hardware, kinds, parallel, sample_files
from dit_jax.checkpoint import Checkpoints
from dit_jax.diffusion.samplers import sample
from dit_jax.distill.teacher_data import training_data
from dit_jax.eval.loop import TrainingEvaluator
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
    loader: an iterator of host-local batches with get_state()/set_state() (default: dit_jax.data.make_loader of
      config.data, or of the teacher samples of ``distill.teacher_data``, :mod:`dit_jax.distill.teacher_data`).
    mesh: default: ``parallel.make_mesh(config.mesh_shape)`` over all devices.
  """
  validate(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = mesh or parallel.make_mesh(tuple(config.mesh_shape))
  evaluator = TrainingEvaluator(config, mesh) if config.eval_every_steps else None  # its files' errors first
  trainer = Trainer(config, mesh)
  kind = kinds.get(config.model.kind)
  if loader is None:  # config.data, or the teacher's samples (generated once) with distill.teacher_data
    loader = data.make_loader(training_data(config, workdir, trainer.teacher, mesh),
                              global_batch_size=config.global_batch_size, seed=config.seed,
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
  # TensorBoard summaries only: the console gets one progress line per log step (the "dit_jax" logger).
  writer = metric_writers.AsyncWriter(metric_writers.SummaryWriter(str(workdir))) if is_main else \
      metric_writers.MultiWriter([])
  flops_per_step = None
  peak = peak_flops(mesh, config.compute_dtype)
  jsonl = (workdir / "metrics.jsonl").open("a") if is_main else None
  sigterm = _Sigterm()
  clock = {"time": time.perf_counter(), "step": start, "read": start, "total": int(state.nonfinite_total)}
  try:
    for step in range(start + 1, config.total_steps + 1):
      batch = next(loader)
      if flops_per_step is None:
        flops_per_step = 3 * kind.flops(trainer.model_config, batch) * config.global_batch_size
      state, metrics = trainer.step(state, rest, batch)
      stop = sigterm.received  # read once: a SIGTERM landing later in this step is handled at the next one
      log = step % config.log_every_steps == 0 or step == config.total_steps
      save = step % config.checkpoint_every_steps == 0 or step == config.total_steps or stop
      grid = config.sample_every_steps and step % config.sample_every_steps == 0
      evaluate = evaluator is not None and not stop and (step % config.eval_every_steps == 0 or
                                                         step == config.total_steps)
      if not (log or save or grid or evaluate):
        continue  # no device read: dispatch runs ahead; the non-finite guard holds the state on device
      scalars = _read(step, state, metrics, clock)
      if log or clock["run"] >= config.nonfinite_abort_after:
        now = time.perf_counter()
        steps_per_s = (step - clock["step"]) / (now - clock["time"])
        clock.update(time=now, step=step)
        scalars.update(steps_per_s=steps_per_s, examples_per_s=steps_per_s * config.global_batch_size,
                       mfu=steps_per_s * flops_per_step / peak, skipped_images=getattr(loader, "skipped", 0))
        writer.write_scalars(step, scalars)
        if jsonl:
          jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
          jsonl.flush()
          _progress_line(config, step, scalars)
      _check_nonfinite(config, clock)
      if save:
        ckpts.save(step, state, rest, {"data": loader.get_state(), "step": step})
      if grid:
        write_sample_grid(config, trainer.ema_model(state, rest), workdir, step, writer)
      if evaluate:  # after the save, so a preemption during it loses no training; not in the steps/s
        began = time.perf_counter()
        scores = evaluator(trainer.ema_model(state, rest))
        clock["time"] += time.perf_counter() - began
        writer.write_scalars(step, {f"eval/{k}": v for k, v in scores.items()})
        if jsonl:
          jsonl.write(json.dumps({"step": step, **scores}) + "\n")
          jsonl.flush()
      if stop:
        break
  finally:
    sigterm.restore()
    ckpts.wait()
    ckpts.close()
    writer.flush()
    if jsonl:
      jsonl.close()
  return state


def peak_flops(mesh: jax.sharding.Mesh, compute_dtype: str) -> float:
  """The MFU denominator: the chip's published bf16 peak times the device count on a known GPU / TPU, else the
  matmul rate measured here (CPU, or a chip dit_jax.hardware does not list); logs which, once."""
  chip = hardware.chip_of(mesh.devices.flat[0])
  if chip is not None and jax.default_backend() != "cpu":
    logger.info("MFU against the published bf16 peak of %d x %s (%.0f TFLOP/s each)", mesh.size, chip.name,
                chip.bf16_flops / 1e12)
    return chip.bf16_flops * mesh.size
  measured = measured_peak_flops(jnp.bfloat16 if compute_dtype == "bfloat16" else jnp.float32)
  logger.info("MFU against a measured %s matmul rate of %d x %.1f GFLOP/s (no published peak for %s)", compute_dtype,
              mesh.size, measured / 1e9, mesh.devices.flat[0].device_kind)
  return measured * mesh.size


def _read(step: int, state: TrainState, metrics: dict, clock: dict) -> dict[str, float]:
  """The step's metrics from the device (the one host sync of a read step); updates ``clock`` with the guard's
  counters: ``at``, the state's step (it stays where a run of non-finite updates reached the limit), ``run``, the
  current run of skipped updates, and ``total``, all skipped so far; warns of updates skipped since the last read."""
  values, (at, run, total) = jax.device_get((metrics, (state.step, state.nonfinite_run, state.nonfinite_total)))
  first, new = clock["read"] + 1, int(total) - clock["total"]
  clock.update(read=step, at=int(at), run=int(run), total=int(total))
  if new:
    logger.warning("steps %d-%d: %d update(s) with a non-finite loss or gradient skipped (%d in a row at step %d)",
                   first, step, new, clock["run"], clock["at"])
  return {k: float(v) for k, v in values.items()}


def _check_nonfinite(config, clock: dict) -> None:
  if clock["run"] >= config.nonfinite_abort_after:
    raise TrainingError(f"{clock['run']} consecutive non-finite updates at step {clock['at']}; stopping (the last "
                        "checkpoint holds finite parameters)")


def _progress_line(config, step: int, scalars: dict[str, float]) -> None:
  eta = int((config.total_steps - step) / max(scalars["steps_per_s"], 1e-9))
  logger.info("step %d/%d  loss %.4f  %.2f steps/s  ETA %d:%02d:%02d  MFU %.1f%%", step, config.total_steps,
              scalars["loss"], scalars["steps_per_s"], eta // 3600, eta // 60 % 60, eta % 60, 100 * scalars["mfu"])


def write_sample_grid(config: ml_collections.ConfigDict, model: nnx.Module, workdir: pathlib.Path, step: int,
                      writer) -> np.ndarray:
  """A grid of EMA samples (conditioned as the kind's ``grid_cond``: labels 0, 1, ..., or class tokens / text rows
  0, 1, ... for an MMDiT) as an image summary and ``<workdir>/samples/<step>.png``."""
  s = config.sample
  kind = kinds.get(config.model.kind)
  cond = kind.grid_cond(config, model, s.num)
  latents = sample(model, cond, jax.random.key(config.seed), method=s.method, steps=s.steps, cfg_mode=s.cfg_mode,
                   flow_convention=config.flow.convention, **kind.guidance_kwargs(config, s.cfg_scale),
                   **kind.grid_sample_kwargs(config))
  grid = sample_files.image_grid(sample_files.displayable(sample_files.to_uint8(jax.device_get(latents))))
  writer.write_images(step, {"samples": grid[None]})
  if jax.process_index() == 0:
    (workdir / "samples").mkdir(exist_ok=True)
    sample_files.save_png(workdir / "samples" / f"{step:07d}.png", grid)
  return grid
