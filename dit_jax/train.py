"""Training: sharded train state, jitted step (VP hybrid loss or rectified flow), EMA, orbax checkpoints with
exact resume, non-finite guard, SIGTERM handling and clu metrics.

``model.kind`` 'dit' trains a class-conditional DiT on {"image", "label"} batches; 'mmdit' trains an SD3-style
MMDiT with rectified flow (SD3 convention) on {"image", "context", "pooled"} batches, dropping each example's
conditioning to zeros with probability ``cond_dropout_prob``.

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
from dit_jax.models.mmdit import MMDiT, MMDiTConfig
from dit_jax.models.mmdit import flops_per_sample as mmdit_flops
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


BATCH_NDIMS = {"dit": {"image": 4, "label": 1}, "mmdit": {"image": 4, "context": 3, "pooled": 2}}


def model_config(config: ml_collections.ConfigDict) -> DiTConfig | MMDiTConfig:
  if config.model.kind == "mmdit":
    return MMDiTConfig(**{**config.mmdit, "qk_norm": config.mmdit.qk_norm or None})
  m = config.model
  fields = dict(input_size=m.input_size, in_channels=m.in_channels, num_classes=m.num_classes,
                learn_sigma=m.learn_sigma, class_dropout_prob=m.class_dropout_prob, mlp_ratio=m.mlp_ratio)
  sizes = {k: m[k] for k in ("hidden_size", "depth", "num_heads", "patch_size") if m[k]}
  if m.name:
    return dit_config(m.name, **fields, **sizes)
  return DiTConfig(**fields, **sizes)


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> DiT | MMDiT:
  dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
  module = MMDiT if config.model.kind == "mmdit" else DiT
  return module(model_config(config), rngs=rngs, dtype=dtype, param_dtype=jnp.float32,
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


def model_flops_per_image(cfg: DiTConfig | MMDiTConfig, batch: dict[str, np.ndarray]) -> float:
  """Forward FLOPs per example (an MMDiT's depend on the batch's latent and context sizes)."""
  if isinstance(cfg, DiTConfig):
    return flops_per_image(cfg)
  _, h, w, _ = batch["image"].shape
  return mmdit_flops(cfg, h, w, batch["context"].shape[1])


def loss_fn(config: ml_collections.ConfigDict, model: DiT | MMDiT, batch: dict[str, jax.Array],
            key: jax.Array) -> jax.Array:
  """Mean training loss of one batch: the VP hybrid loss or the rectified-flow velocity MSE."""
  x0 = batch["image"]
  k_t, k_noise, k_drop = jax.random.split(key, 3)
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  if config.model.kind == "mmdit":
    keep = jax.random.bernoulli(k_drop, 1.0 - config.cond_dropout_prob, (x0.shape[0],))
    context = jnp.where(keep[:, None, None], batch["context"], 0.0)
    pooled = jnp.where(keep[:, None], batch["pooled"], 0.0)
    net = lambda x, t: model(x, t, context, pooled).astype(jnp.float32)
  else:
    net = lambda x, t: model(x, t, batch["label"], dropout_key=k_drop).astype(jnp.float32)
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
    self.batch_ndims = BATCH_NDIMS[config.model.kind]
    batch_sh = {k: parallel.batch_sharding(mesh, ndim=n) for k, n in self.batch_ndims.items()}
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
    """One update from a host-local batch; keys the model does not read (e.g. "label" for MMDiT) are ignored."""
    missing = [k for k in self.batch_ndims if k not in batch]
    if missing:
      raise ValueError(f"the batch has no {', '.join(map(repr, missing))} (a {self.config.model.kind} trains on "
                       f"{', '.join(self.batch_ndims)})")
    local = {k: batch[k] for k in self.batch_ndims}
    return self._step(state, rest, parallel.global_batch(local, self.mesh))

  def ema_model(self, state: TrainState, rest: nnx.State) -> DiT | MMDiT:
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


def write_model_meta(workdir: pathlib.Path, config: ml_collections.ConfigDict, model_cfg: DiTConfig | MMDiTConfig,
                     conditioning: dict | None = None) -> None:
  """``<workdir>/dit_jax.json`` so ``dit_jax.load(workdir)`` returns the latest EMA model. For an MMDiT,
  ``training.conditioning`` records how labels become context / pooled (:func:`conditioning_meta`)."""
  training = {"checkpoints": "checkpoints", "objective": config.objective, "flow_convention": config.flow.convention,
              "flow_shift": config.flow.shift}
  if conditioning is not None:
    training["conditioning"] = conditioning
  meta = {"format_version": checkpoint.FORMAT_VERSION, "kind": config.model.kind, "config": model_cfg.to_dict(),
          "training": training}
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
                              process_index=jax.process_index(), process_count=jax.process_count(),
                              **conditioning_dims(config))
  ckpts = Checkpoints(workdir, config)
  start = ckpts.latest_step()
  if start is None:
    state, rest = trainer.init()
    start = 0
    if jax.process_index() == 0:
      write_model_meta(workdir, config, trainer.model_config, conditioning_meta(config, loader))
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
        flops_per_step = 3 * model_flops_per_image(trainer.model_config, batch) * config.global_batch_size
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


def conditioning_dims(config: ml_collections.ConfigDict) -> dict[str, int]:
  """The MMDiT's context / pooled widths for the data loader (empty for a DiT)."""
  if config.model.kind != "mmdit":
    return {}
  return {"context_dim": config.mmdit.joint_attention_dim, "pooled_dim": config.mmdit.pooled_projection_dim}


def conditioning_meta(config: ml_collections.ConfigDict, loader=None) -> dict | None:
  """How an MMDiT run is conditioned, for the workdir's metadata: the class-token table's spec (rebuilt by
  ``dit_jax.data.class_tokens_from_spec``) or {"kind": "text", "text_folder"}; None for a DiT."""
  if config.model.kind != "mmdit":
    return None
  d = config.data
  if d.conditioning == "text":
    return {"kind": "text", "text_folder": str(d.text_folder)}
  from dit_jax import data

  source = getattr(loader, "source", None)
  num_classes = getattr(source, "num_classes", None) or getattr(loader, "num_classes", None)
  if num_classes is None:
    num_classes = data.num_classes_of(data.make_source(d))
  return data.ClassTokens(int(num_classes), d.class_token_length, **conditioning_dims(config),
                          seed=d.class_token_seed).spec()


def sample_grid_cond(config: ml_collections.ConfigDict, num: int, num_classes: int | None = None):
  """What a sample grid is conditioned on: labels 0, 1, ... (DiT; class tokens for an MMDiT) or, for text
  conditioning, the first ``num`` rows of the text embeddings."""
  if config.model.kind != "mmdit":
    return np.arange(num) % num_classes
  from dit_jax import data

  if config.data.conditioning == "text":
    return data.TextEmbeddings(config.data.text_folder).rows(num)
  tokens = data.class_tokens_from_spec(conditioning_meta(config))
  return tokens(np.arange(num) % tokens.num_classes)


def write_sample_grid(config: ml_collections.ConfigDict, model: DiT | MMDiT, workdir: pathlib.Path, step: int,
                      writer) -> np.ndarray:
  """A grid of EMA samples (labels 0, 1, ...; class tokens or text rows 0, 1, ... for an MMDiT) as an image
  summary and ``<workdir>/samples/<step>.png``."""
  from dit_jax import sampling
  from dit_jax.diffusion.samplers import sample

  s = config.sample
  key = jax.random.key(config.seed)
  if config.model.kind == "mmdit":
    latents = sample(model, sample_grid_cond(config, s.num), key, method=s.method, steps=s.steps,
                     cfg_scale=s.cfg_scale, shift=config.flow.shift)
  else:
    latents = sample(model, sample_grid_cond(config, s.num, model.config.num_classes), key, method=s.method,
                     steps=s.steps, cfg_scale=s.cfg_scale, cfg_mode=s.cfg_mode, flow_convention=config.flow.convention,
                     shift=config.flow.shift)
  grid = sampling.image_grid(sampling.displayable(sampling.to_uint8(jax.device_get(latents))))
  writer.write_images(step, {"samples": grid[None]})
  if jax.process_index() == 0:
    (workdir / "samples").mkdir(exist_ok=True)
    sampling.save_png(workdir / "samples" / f"{step:07d}.png", grid)
  return grid
