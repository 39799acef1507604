"""The train step: model and optimizer from a training config, the loss (the kind's network through the
configured objective), and :class:`Trainer`, whose jitted step runs on a mesh with explicit shardings.

The step is ``jax.jit`` over ``nnx.split`` state with shardings derived from the parameters' logical axis names
(:mod:`dit_jax.parallel`) and the state donated. Randomness of step s is ``fold_in(key(seed), s)``; micro-batch i
of an accumulated step uses ``fold_in(key, i)``. Non-finite updates are skipped and counted; once
``config.nonfinite_abort_after`` are skipped in a row the step is a no-op (the state, its step included, stays as it
was), so the host can check the guard only when it reads the state.

An objective in ``distill.AUXILIARY`` (LADD) trains a second network beside the model: its parameters and optimizer
state are ``TrainState.aux_params`` / ``aux_opt_state`` (None otherwise), sharded from their logical names, both
gradients come from the objective's ``grads`` at the step's parameters, both updates happen in the same step under
one non-finite guard, and the objective's own metrics (LADD: g_loss, d_loss, r1) plus ``aux_grad_norm`` join the
step's metrics.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from dit_jax import distill, kinds, parallel
from dit_jax.diffusion.objectives import OBJECTIVES
from dit_jax.distill.teacher import Teacher, init_from_teacher
from dit_jax.train_config import validate


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 ()
  params: nnx.State
  opt_state: Any
  ema: nnx.State
  nonfinite_run: jax.Array  # consecutive skipped updates
  nonfinite_total: jax.Array
  # a second network an objective trains with its own optimizer (LADD's discriminator); None otherwise
  aux_params: nnx.State | None = None
  aux_opt_state: Any = None


def model_config(config: ml_collections.ConfigDict):
  """The model config (DiTConfig, MMDiTConfig, ...) a training config describes."""
  return kinds.get(config.model.kind).model_config(config)


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
  dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
  return kinds.get(config.model.kind).build(model_config(config), rngs=rngs, dtype=dtype, param_dtype=jnp.float32,
                                            attention_impl=config.attention_impl, remat=config.remat,
                                            scan_layers=config.scan_layers)


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


def _opt_shardings(tx: optax.GradientTransformation, abstract_params: nnx.State, param_sh, mesh):
  """Optimizer-state shardings: a parameter's moments as the parameter, everything else (counts) replicated."""
  opt_abstract = jax.eval_shape(tx.init, abstract_params)
  return optax.tree_map_params(tx, lambda _, s: s, opt_abstract, param_sh,
                               transform_non_params=lambda _: parallel.replicated(mesh),
                               is_leaf=lambda x: isinstance(x, nnx.Variable))


def loss_fn(config: ml_collections.ConfigDict, model: nnx.Module, batch: dict[str, jax.Array],
            key: jax.Array, teacher: nnx.Module | None = None) -> jax.Array:
  """Mean training loss of one batch: ``config.objective`` applied to the kind's network (a distillation
  objective: to the student and the frozen ``teacher``)."""
  if config.objective in distill.OBJECTIVES:
    return distill.OBJECTIVES[config.objective](config, kinds.get(config.model.kind), model, teacher, batch, key)
  x0 = batch["image"]
  k_t, k_noise, k_drop = jax.random.split(key, 3)
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  net = kinds.get(config.model.kind).network(config, model, batch, k_drop)
  return OBJECTIVES[config.objective](config, net, x0, noise, k_t)


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
    self.model_config = abstract.config
    # an objective's second network (LADD's discriminator): parameters only, sharded from their logical names
    self.aux = distill.AUXILIARY.get(config.objective)
    aux_sh = aux_opt_sh = None
    if self.aux is not None:
      self.aux_tx = self.aux.optimizer(config)
      abstract_aux = nnx.eval_shape(lambda: self.aux.build(config, self.model_config, nnx.Rngs(0)))
      self.aux_graphdef, abstract_aux_params = nnx.split(abstract_aux, nnx.Param)
      aux_sh = parallel.shardings(abstract_aux_params, mesh)
      aux_opt_sh = _opt_shardings(self.aux_tx, abstract_aux_params, aux_sh, mesh)
    scalar = parallel.replicated(mesh)
    self.state_shardings = TrainState(step=scalar, params=param_sh,
                                      opt_state=_opt_shardings(self.tx, abstract_params, param_sh, mesh),
                                      ema=param_sh, nonfinite_run=scalar, nonfinite_total=scalar, aux_params=aux_sh,
                                      aux_opt_state=aux_opt_sh)
    self.global_batch = config.global_batch_size
    # the frozen teacher of a distillation objective (sharded like the student; an argument of every step)
    self.teacher = Teacher.load(config, self.model_config, mesh) if config.teacher.checkpoint and \
        config.objective in distill.OBJECTIVES else None
    teacher_sh = None if self.teacher is None else parallel.shardings(self.teacher.state, mesh)
    self._init = jax.jit(self._init_fn, in_shardings=(None, teacher_sh),
                         out_shardings=(self.state_shardings, self.rest_shardings))
    self.batch_ndims = kinds.get(config.model.kind).batch_ndims
    batch_sh = {k: parallel.batch_sharding(mesh, ndim=n) for k, n in self.batch_ndims.items()}
    self._step = jax.jit(self._step_fn, in_shardings=(self.state_shardings, self.rest_shardings, batch_sh,
                                                      teacher_sh),
                         out_shardings=(self.state_shardings, scalar), donate_argnums=(0,))

  @property
  def _teacher_state(self):
    return None if self.teacher is None else self.teacher.state

  def _init_fn(self, key: jax.Array, teacher: nnx.State | None = None):
    model = build_model(self.config, nnx.Rngs(key))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    if teacher is not None and self.config.teacher.init_student:
      if self.config.scan_layers:  # the student's blocks are stored stacked
        teacher = kinds.get(self.config.model.kind).stack_blocks(self.teacher.config, teacher)
      params = init_from_teacher(params, teacher)
    aux_params = aux_opt_state = None
    if self.aux is not None:
      aux = self.aux.build(self.config, self.model_config, nnx.Rngs(jax.random.fold_in(key, 1)))
      _, aux_params = nnx.split(aux, nnx.Param)
      aux_opt_state = self.aux_tx.init(aux_params)
    zero = jnp.zeros((), jnp.int32)
    state = TrainState(step=zero, params=params, opt_state=self.tx.init(params), ema=jax.tree.map(jnp.copy, params),
                       nonfinite_run=zero, nonfinite_total=zero, aux_params=aux_params, aux_opt_state=aux_opt_state)
    return state, rest

  def init(self) -> tuple[TrainState, nnx.State]:
    with jax.set_mesh(self.mesh):
      return self._init(jax.random.key(self.config.seed), self._teacher_state)

  def abstract_state(self) -> tuple[TrainState, nnx.State]:
    """Shapes, dtypes and target shardings of (state, rest), for restoring onto this mesh."""
    shapes = jax.eval_shape(self._init_fn, jax.random.key(0), self._teacher_state)
    with_sharding = lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
    return (jax.tree.map(with_sharding, shapes[0], self.state_shardings),
            jax.tree.map(with_sharding, shapes[1], self.rest_shardings))

  def _step_fn(self, state: TrainState, rest: nnx.State, batch: dict[str, jax.Array],
               teacher: nnx.State | None = None):
    config = self.config
    key = jax.random.fold_in(jax.random.key(config.seed), state.step)
    teacher = None if teacher is None else self.teacher.model(teacher)

    def loss_of(params, micro, k):
      return loss_fn(config, nnx.merge(self.graphdef, params, rest), micro, k, teacher)

    def grads_of(params, aux_params, micro, k):
      """(loss, the objective's own metrics, grads, the second network's grads) of one (micro-)batch."""
      if self.aux is not None:
        return self.aux.grads(config, kinds.get(config.model.kind), lambda p: nnx.merge(self.graphdef, p, rest),
                              params, lambda p: nnx.merge(self.aux_graphdef, p), aux_params, teacher, micro, k)
      loss, grads = jax.value_and_grad(loss_of)(params, micro, k)
      return loss, {}, grads, None

    accum = config.grad_accum_steps
    if accum == 1:
      loss, aux_metrics, grads, aux_grads = grads_of(state.params, state.aux_params, batch, key)
    else:
      micro = jax.tree.map(lambda a: a.reshape(accum, a.shape[0] // accum, *a.shape[1:]), batch)

      def add(carry, inputs):
        i, mb = inputs
        out = grads_of(state.params, state.aux_params, mb, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, carry, out), None

      shapes = jax.eval_shape(grads_of, state.params, state.aux_params, jax.tree.map(lambda a: a[0], micro), key)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      total, _ = jax.lax.scan(add, zeros, (jnp.arange(accum), micro))
      loss, aux_metrics, grads, aux_grads = jax.tree.map(lambda g: g / accum, total)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if self.aux is not None:  # both networks' losses and gradients must be finite
      aux_metrics = {**aux_metrics, "aux_grad_norm": optax.global_norm(aux_grads)}
      finite = finite & jnp.all(jnp.isfinite(jnp.stack(jax.tree.leaves(aux_metrics))))
    live = state.nonfinite_run < config.nonfinite_abort_after  # else halted: the host raises at its next read
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    aux_params, aux_opt_state = state.aux_params, state.aux_opt_state
    if self.aux is not None:
      aux_updates, aux_opt_state = self.aux_tx.update(aux_grads, state.aux_opt_state, state.aux_params)
      aux_params = optax.apply_updates(state.aux_params, aux_updates)
    d = config.ema_decay
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state.ema, params)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite & live, n, o), new, old)
    skipped = (live & ~finite).astype(jnp.int32)
    new_state = TrainState(
        step=state.step + live.astype(jnp.int32), params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state), ema=keep(ema, state.ema),
        nonfinite_run=jnp.where(live & finite, 0, state.nonfinite_run + skipped),
        nonfinite_total=state.nonfinite_total + skipped, aux_params=keep(aux_params, state.aux_params),
        aux_opt_state=keep(aux_opt_state, state.aux_opt_state))
    lr = learning_rate(config)(state.step)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "finite": finite.astype(jnp.float32),
               "nonfinite_run": new_state.nonfinite_run, "nonfinite_total": new_state.nonfinite_total, **aux_metrics}
    return new_state, metrics

  def step(self, state: TrainState, rest: nnx.State, batch: dict[str, np.ndarray]):
    """One update from a host-local batch; keys the model does not read (e.g. "label" for MMDiT) are ignored."""
    missing = [k for k in self.batch_ndims if k not in batch]
    if missing:
      raise ValueError(f"the batch has no {', '.join(map(repr, missing))} (a {self.config.model.kind} trains on "
                       f"{', '.join(self.batch_ndims)})")
    local = {k: batch[k] for k in self.batch_ndims}
    with jax.set_mesh(self.mesh):  # traced for the mesh's devices (attention picks its kernel from them)
      return self._step(state, rest, parallel.global_batch(local, self.mesh), self._teacher_state)

  def lower_step(self, batch: dict[str, jax.ShapeDtypeStruct]) -> jax.stages.Lowered:
    """The step lowered for global ``batch`` shapes, ahead of time (no device memory; ``.compile()`` for a
    topology's devices works without them, as ``tools/plan.py`` does)."""
    state, rest = self.abstract_state()
    with jax.set_mesh(self.mesh):
      teacher = None if self.teacher is None else jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), self.teacher.state)
      return self._step.lower(state, rest, {k: batch[k] for k in self.batch_ndims}, teacher)

  def ema_model(self, state: TrainState, rest: nnx.State) -> nnx.Module:
    return nnx.merge(self.graphdef, state.ema, rest)
