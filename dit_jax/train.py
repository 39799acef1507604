"""Training: sharded train state, jitted step (VP hybrid loss or rectified flow), EMA, orbax checkpoints with
exact resume, non-finite guard, SIGTERM handling and clu metrics.

The step is ``jax.jit`` over ``nnx.split`` state with explicit shardings derived from the parameters' logical
axis names (:mod:`dit_jax.parallel`) and the state donated. Randomness of step s is ``fold_in(key(seed), s)`` and
the input position is checkpointed, so a resumed run computes exactly what an uninterrupted one would.
"""
from __future__ import annotations

import json
import logging
import pathlib
import signal
import time
from typing import Any, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from dit_jax import checkpoint, parallel
from dit_jax.diffusion import flow, vp
from dit_jax.models.dit import DiT, DiTConfig, dit_config, flops_per_image
from dit_jax.train_config import validate

logger = logging.getLogger("dit_jax")


class TrainingError(RuntimeError):
  """Training cannot continue (e.g. too many consecutive non-finite updates); the message is one line."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 ()
  params: nnx.State
  opt_state: Any
  ema: nnx.State
  nonfinite_run: jax.Array  # consecutive skipped updates
  nonfinite_total: jax.Array


# ---------------------------------------------------------------------------------------------------------------
# Model, optimizer, objective


def model_config(config: ml_collections.ConfigDict) -> DiTConfig:
  m = config.model
  fields = dict(input_size=m.input_size, in_channels=m.in_channels, num_classes=m.num_classes,
                learn_sigma=m.learn_sigma, class_dropout_prob=m.class_dropout_prob, mlp_ratio=m.mlp_ratio)
  sizes = {k: m[k] for k in ("hidden_size", "depth", "num_heads", "patch_size") if m[k]}
  if m.name:
    return dit_config(m.name, **fields, **sizes)
  return DiTConfig(**fields, **sizes)


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> DiT:
  dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
  return DiT(model_config(config), rngs=rngs, dtype=dtype, param_dtype=jnp.float32,
             attention_impl=config.attention_impl, remat=config.remat, scan_layers=config.scan_layers)


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
  o = config.optimizer
  if o.schedule == "cosine":
    warmup = max(o.warmup_steps, 1)
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(config.total_steps, warmup + 1), o.min_lr)
  if o.warmup_steps:
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, o.warmup_steps), optax.constant_schedule(o.lr)],
                                [o.warmup_steps])
  return optax.constant_schedule(o.lr)


def optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optimizer
  adamw = optax.adamw(learning_rate(config), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw) if o.grad_clip > 0 else adamw


def loss_fn(config: ml_collections.ConfigDict, model: DiT, batch: dict[str, jax.Array], key: jax.Array) -> jax.Array:
  """Mean training loss of one batch: the VP hybrid loss or the rectified-flow velocity MSE."""
  x0, y = batch["image"], batch["label"]
  k_t, k_noise, k_drop = jax.random.split(key, 3)
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  net = lambda x, t: model(x, t, y, dropout_key=k_drop).astype(jnp.float32)
  if config.objective == "vp":
    diffusion = vp.create_diffusion("")
    t = jax.random.randint(k_t, (x0.shape[0],), 0, diffusion.num_timesteps)
    return diffusion.training_losses(net, x0, t, noise)["loss"].mean()
  f = config.flow
  conv = flow.CONVENTIONS[f.convention]
  sigma = flow.sample_sigmas(k_t, (x0.shape[0],), f.t_sampler, f.loc, f.scale, f.mode_scale)
  if f.shift != 1.0:
    sigma = flow.shift_sigmas(sigma, f.shift)
  pred = conv.to_sd3_velocity(net(flow.interpolate(x0, noise, sigma), conv.model_time(sigma))[..., :x0.shape[-1]])
  return jnp.mean((pred - flow.velocity_target(x0, noise)) ** 2)


# ---------------------------------------------------------------------------------------------------------------
# Train state and step


class Trainer:
  """Holds the mesh, the abstract model and the compiled init / step functions for one config."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    validate(config)
    self.config = config
    self.mesh = mesh
    self.tx = optimizer(config)
    abstract = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
    self.graphdef, abstract_params, abstract_rest = nnx.split(abstract, nnx.Param, ...)
    param_sh = parallel.shardings(abstract_params, mesh)
    self.rest_shardings = parallel.shardings(abstract_rest, mesh)
    opt_abstract = jax.eval_shape(self.tx.init, abstract_params)
    opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, opt_abstract, param_sh,
                                   transform_non_params=lambda _: parallel.replicated(mesh),
                                   is_leaf=lambda x: isinstance(x, nnx.Variable))
    scalar = parallel.replicated(mesh)
    self.state_shardings = TrainState(step=scalar, params=param_sh, opt_state=opt_sh, ema=param_sh,
                                      nonfinite_run=scalar, nonfinite_total=scalar)
    self.model_config = abstract.config
    self.global_batch = config.global_batch_size
    self._init = jax.jit(self._init_fn, out_shardings=(self.state_shardings, self.rest_shardings))
    batch_sh = {"image": parallel.batch_sharding(mesh, ndim=4), "label": parallel.batch_sharding(mesh)}
    self._step = jax.jit(self._step_fn, in_shardings=(self.state_shardings, self.rest_shardings, batch_sh),
                         out_shardings=(self.state_shardings, scalar), donate_argnums=(0,))

  def _init_fn(self, key: jax.Array):
    model = build_model(self.config, nnx.Rngs(key))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    zero = jnp.zeros((), jnp.int32)
    state = TrainState(step=zero, params=params, opt_state=self.tx.init(params), ema=jax.tree.map(jnp.copy, params),
                       nonfinite_run=zero, nonfinite_total=zero)
    return state, rest

  def init(self) -> tuple[TrainState, nnx.State]:
    return self._init(jax.random.key(self.config.seed))

  def abstract_state(self) -> tuple[TrainState, nnx.State]:
    """Shapes, dtypes and target shardings of (state, rest), for restoring onto this mesh."""
    shapes = jax.eval_shape(self._init_fn, jax.random.key(0))
    with_sharding = lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
    return (jax.tree.map(with_sharding, shapes[0], self.state_shardings),
            jax.tree.map(with_sharding, shapes[1], self.rest_shardings))

  def _step_fn(self, state: TrainState, rest: nnx.State, batch: dict[str, jax.Array]):
    config = self.config
    key = jax.random.fold_in(jax.random.key(config.seed), state.step)

    def loss_of(params, micro, k):
      return loss_fn(config, nnx.merge(self.graphdef, params, rest), micro, k)

    accum = config.grad_accum_steps
    if accum == 1:
      loss, grads = jax.value_and_grad(loss_of)(state.params, batch, key)
    else:
      micro = jax.tree.map(lambda a: a.reshape(accum, a.shape[0] // accum, *a.shape[1:]), batch)

      def add(carry, inputs):
        i, mb = inputs
        l, g = jax.value_and_grad(loss_of)(state.params, mb, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, carry, (l, g)), None

      zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
      (loss, grads), _ = jax.lax.scan(add, zeros, (jnp.arange(accum), micro))
      loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    d = config.ema_decay
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state.ema, params)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
        step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
        ema=keep(ema, state.ema), nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
    lr = learning_rate(config)(state.step)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "finite": finite.astype(jnp.float32),
               "nonfinite_run": new_state.nonfinite_run, "nonfinite_total": new_state.nonfinite_total}
    return new_state, metrics

  def step(self, state: TrainState, rest: nnx.State, batch: dict[str, np.ndarray]):
    return self._step(state, rest, parallel.global_batch(batch, self.mesh))

  def ema_model(self, state: TrainState, rest: nnx.State) -> DiT:
    return nnx.merge(self.graphdef, state.ema, rest)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


class Checkpoints:
  """orbax CheckpointManager over <workdir>/checkpoints. Items: 'train' (TrainState without the EMA), 'ema' and
  'rest' (the EMA parameters and frozen tables: all ``dit_jax.load`` reads) and 'extra' (JSON: input position).
  Async saves; keeps the last N plus every K-th step."""

  ITEMS = ("train", "ema", "rest", "extra")

  def __init__(self, workdir: pathlib.Path, config: ml_collections.ConfigDict | None = None):
    import orbax.checkpoint as ocp

    self.args = ocp.args
    if config is None:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                             keep_period=config.keep_period or None, create=True,
                                             enable_async_checkpointing=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(pathlib.Path(workdir).absolute() / "checkpoints", options=options,
                                         item_names=self.ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, rest: nnx.State, extra: dict) -> None:
    a = self.args
    self.manager.save(step, args=a.Composite(train=a.StandardSave(state.replace(ema=None)),
                                             ema=a.StandardSave(state.ema), rest=a.StandardSave(rest),
                                             extra=a.JsonSave(extra)), force=True)

  def restore(self, step: int, abstract_state: TrainState, abstract_rest):
    a = self.args
    out = self.manager.restore(step, args=a.Composite(
        train=a.StandardRestore(abstract_state.replace(ema=None)), ema=a.StandardRestore(abstract_state.ema),
        rest=a.StandardRestore(abstract_rest), extra=a.JsonRestore()))
    return out["train"].replace(ema=out["ema"]), out["rest"], out["extra"]

  def restore_ema(self, step: int, abstract_params, abstract_rest):
    a = self.args
    out = self.manager.restore(step, args=a.Composite(ema=a.StandardRestore(abstract_params),
                                                      rest=a.StandardRestore(abstract_rest)))
    return out["ema"], out["rest"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def write_model_meta(workdir: pathlib.Path, config: ml_collections.ConfigDict, model_cfg: DiTConfig) -> None:
  """``<workdir>/dit_jax.json`` so ``dit_jax.load(workdir)`` returns the latest EMA model."""
  meta = {"format_version": checkpoint.FORMAT_VERSION, "kind": "dit", "config": model_cfg.to_dict(),
          "training": {"checkpoints": "checkpoints", "objective": config.objective,
                       "flow_convention": config.flow.convention}}
  path = workdir / checkpoint.META
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(meta, indent=2) + "\n")
  tmp.replace(path)


# ---------------------------------------------------------------------------------------------------------------
# Loop


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
  from clu import metric_writers, periodic_actions

  validate(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = mesh or parallel.make_mesh(tuple(config.mesh_shape))
  trainer = Trainer(config, mesh)
  if loader is None:
    from dit_jax import data
    loader = data.make_loader(config.data, global_batch_size=config.global_batch_size, seed=config.seed,
                              process_index=jax.process_index(), process_count=jax.process_count())
  ckpts = Checkpoints(workdir, config)
  start = ckpts.latest_step()
  if start is None:
    state, rest = trainer.init()
    start = 0
    if jax.process_index() == 0:
      write_model_meta(workdir, config, trainer.model_config)
  else:
    state, rest, extra = ckpts.restore(start, *trainer.abstract_state())
    loader.set_state(extra["data"])
    logger.info("resumed from step %d in %s", start, workdir)

  is_main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(str(workdir), just_logging=not is_main)
  progress = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer)
  flops_per_step = 3 * flops_per_image(trainer.model_config) * config.global_batch_size
  peak = measured_peak_flops(jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32) * mesh.size
  jsonl = (workdir / "metrics.jsonl").open("a") if is_main else None
  sigterm = _Sigterm()
  last_time, last_step = time.perf_counter(), start
  try:
    for step in range(start + 1, config.total_steps + 1):
      state, metrics = trainer.step(state, rest, next(loader))
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


def write_sample_grid(config: ml_collections.ConfigDict, model: DiT, workdir: pathlib.Path, step: int,
                      writer) -> np.ndarray:
  """A grid of EMA samples (labels 0, 1, ...) as an image summary and ``<workdir>/samples/<step>.png``."""
  from dit_jax import sampling
  from dit_jax.diffusion.samplers import sample

  s = config.sample
  labels = np.arange(s.num) % model.config.num_classes
  latents = sample(model, labels, jax.random.key(config.seed), method=s.method, steps=s.steps, cfg_scale=s.cfg_scale,
                   cfg_mode=s.cfg_mode, flow_convention=config.flow.convention, shift=config.flow.shift)
  grid = sampling.image_grid(sampling.displayable(sampling.to_uint8(jax.device_get(latents))))
  writer.write_images(step, {"samples": grid[None]})
  if jax.process_index() == 0:
    (workdir / "samples").mkdir(exist_ok=True)
    sampling.save_png(workdir / "samples" / f"{step:07d}.png", grid)
  return grid
