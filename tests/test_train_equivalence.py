"""Training equivalences: gradient accumulation applies the gradient of the mean micro-batch loss under the step's
per-micro-batch randomness; DiT remat / scan_layers change neither outputs nor gradients; bf16 compute stays within
bf16 rounding of fp32 (and really computes in bf16)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dit_jax import kinds, parallel
from dit_jax.trainer import Trainer, build_model, loss_fn, model_config
from tests.helpers import rel_err
from tests.helpers.training import ToyLoader, ToyTextLoader, tiny_config, tiny_mmdit_config

KEY = jax.random.key(0)


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree.leaves(tree)])


def _randomized(params: nnx.State, seed: int = 0) -> nnx.State:
  """Random values in the structure of ``params`` (concrete or abstract): matrices N(0, 1/fan_in), vectors
  N(0, 0.05^2); nothing zero, so the zero-initialised adaLN / final layers pass gradients on."""
  rng = np.random.default_rng(seed)
  std = lambda v: v.shape[0] ** -0.5 if v.ndim == 2 else 0.05
  return jax.tree.map(lambda v: jnp.asarray(std(v) * rng.standard_normal(v.shape), v.dtype), params)


# ---------------------------------------------------------------------------------------------------------------
# The only uses of dit_jax.trainer (Trainer, build_model, loss_fn) in this file.


def _abstract(config) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """``build_model(config)`` traced abstractly: (graphdef with compute dtype / remat / scan, params, rest)."""
  return nnx.split(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0))), nnx.Param, ...)


def _graphdef(config) -> nnx.GraphDef:
  return _abstract(config)[0]


def _init(config) -> tuple[nnx.State, nnx.State]:
  """Random params and frozen tables (rest) in ``build_model(config)``'s structure (nothing compiled)."""
  _, params, rest = _abstract(config)
  return _randomized(params, 0), _randomized(rest, 1)


def _layout(config):
  """(stack, unstack): per-block params <-> ``build_model(config)``'s layout (blocks stacked with scan_layers)."""
  if not config.scan_layers:
    return (lambda s: s), (lambda s: s)
  kind, cfg = kinds.get(config.model.kind), model_config(config)
  return (lambda s: kind.stack_blocks(cfg, s)), (lambda s: kind.unstack_blocks(cfg, s))


def _loss(config, graphdef, params, rest, batch, key) -> jax.Array:
  return loss_fn(config, nnx.merge(graphdef, params, rest), batch, key)


def _first_trainer_step(config, batch) -> tuple[nnx.State, np.ndarray, float, nnx.State]:
  """One ``Trainer.step`` from the initial state with randomized params: (params, params after, logged loss, rest)."""
  trainer = Trainer(config, parallel.make_mesh((1, 1, 1), jax.devices()[:1]))
  state, rest = trainer.init()
  params = _randomized(state.params)
  state = state.replace(params=jax.tree.map(jnp.copy, params), ema=jax.tree.map(jnp.copy, params))  # donated
  new_state, metrics = trainer.step(state, rest, batch)
  return params, _flat(new_state.params), float(metrics["loss"]), rest


# ---------------------------------------------------------------------------------------------------------------


def _loss_grads_output(config, graphdef, params, rest, batch, forward=None):
  """(training loss under KEY, its flat gradient, ``forward(model)`` or None), in one jit. ``params`` and the
  gradient are per block; a scan_layers model gets them stacked (:func:`_layout`)."""
  def loss(p):
    return _loss(config, graphdef, p, rest, batch, KEY), forward(nnx.merge(graphdef, p, rest)) if forward else None

  stack, unstack = _layout(config)
  (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(stack(params))
  return float(value), _flat(unstack(grads)), out


@pytest.fixture(scope="module")
def dit():
  """The tiny flow DiT of the training tests: (config, params, rest, batch, forward, fp32 loss / grads / output)."""
  config = tiny_config("flow")
  params, rest = _init(config)
  batch = {k: jnp.asarray(v) for k, v in next(ToyLoader(8)).items()}
  t = jnp.linspace(0, 999, 8)
  forward = lambda model: model(batch["image"], t, batch["label"])
  fp32 = _loss_grads_output(config, _graphdef(config), params, rest, batch, forward)
  return config, params, rest, batch, forward, fp32


# ---------------------------------------------------------------------------------------------------------------
# Gradient accumulation

ACCUM, SCALE = 2, 1e3


def test_grad_accumulation_applies_the_gradient_of_the_mean_micro_batch_loss():
  """k micro-batches (contiguous slices, micro-batch i keyed fold_in(fold_in(key(seed), step), i)) accumulate to
  the gradient of the mean of their losses, taken in one jax.grad over the whole batch. The applied gradient is
  read off the first update: with AdamW's eps >> |g| and lr = SCALE eps, it is -SCALE g (mu_hat = g)."""
  config = tiny_config("flow", steps=1, batch=8)
  config.model.depth = 1
  config.grad_accum_steps = ACCUM
  config.optimizer.update(eps=1e10, lr=1e10 * SCALE, warmup_steps=0, weight_decay=0.0, grad_clip=0.0)
  batch = next(ToyLoader(8))
  params, after, logged, rest = _first_trainer_step(config, batch)
  applied = (_flat(params) - after) / SCALE

  graphdef = _graphdef(config)
  step_key = jax.random.fold_in(jax.random.key(config.seed), 0)
  keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(ACCUM))
  micro = {k: v.reshape(ACCUM, -1, *v.shape[1:]) for k, v in batch.items()}  # contiguous slices

  def full_batch_loss(p):  # the whole batch at once, micro-batch i's randomness drawn from keys[i]
    return jnp.mean(jax.vmap(lambda m, k: _loss(config, graphdef, p, rest, m, k))(micro, keys))

  loss, grads = jax.jit(jax.value_and_grad(full_batch_loss))(params)
  err = rel_err(applied, _flat(grads))
  print(f"accumulated vs full-batch gradient: rel err {err:.2e}; loss {logged} vs {float(loss)}")
  assert err <= 1e-5, f"accumulated gradient vs full-batch gradient: rel err {err:.2e} > 1e-5"
  assert abs(logged - float(loss)) <= 1e-6 * abs(float(loss)), f"logged loss {logged} vs {float(loss)}"


# ---------------------------------------------------------------------------------------------------------------
# remat / scan_layers


def test_dit_remat_and_scan_change_nothing(dit):
  """Rematerialised ('full', 'dots') and scanned DiT blocks, built from the config as training does: the plain
  model's outputs, training loss and gradients."""
  config, params, rest, batch, forward, (want, want_grads, want_out) = dit
  for remat, scan in (("full", True), ("dots", False)):
    variant = config.copy_and_resolve_references()
    variant.update(remat=remat, scan_layers=scan)
    got, grads, out = _loss_grads_output(variant, _graphdef(variant), params, rest, batch, forward)
    out_err, err = rel_err(out, want_out), rel_err(grads, want_grads)
    message = f"remat {remat}, scan {scan}: output rel err {out_err:.1e}, loss {got} vs {want}, grads rel err {err:.1e}"
    print(message)
    assert out_err <= 1e-6 and abs(got - want) <= 1e-6 * abs(want) and err <= 1e-5, message


# ---------------------------------------------------------------------------------------------------------------
# bf16 compute

# bf16 keeps 8 significant bits (machine epsilon 2^-8 ~ 3.9e-3). Measured over 8 parameter draws each (DiT and
# MMDiT): loss <= 1.9e-3 relative, gradients <= 1.2e-2 relative max-abs error.
BF16_LOSS_TOL, BF16_GRAD_TOL = 5e-3, 2.5e-2


def _check_bf16(kind, config, params, rest, batch, want, want_grads):
  bf16 = config.copy_and_resolve_references()
  bf16.compute_dtype = "bfloat16"
  got, grads, _ = _loss_grads_output(bf16, _graphdef(bf16), params, rest, batch)
  loss_err, grad_err = abs(got - want) / abs(want), rel_err(grads, want_grads)
  print(f"{kind} bf16 vs fp32: loss rel err {loss_err:.2e}, grads rel err {grad_err:.2e}")
  assert loss_err <= BF16_LOSS_TOL and grad_err <= BF16_GRAD_TOL, (
      f"{kind} bf16 vs fp32: loss rel err {loss_err:.2e} (tol {BF16_LOSS_TOL}), grads {grad_err:.2e} "
      f"(tol {BF16_GRAD_TOL})")
  assert grad_err > 1e-4, f"{kind}: bf16 gradients equal fp32's (rel err {grad_err:.1e}): bf16 compute not used"


def test_dit_bf16_loss_and_grads_are_fp32_within_bf16_rounding(dit):
  """compute_dtype 'bfloat16' (fp32 parameters and gradients): the training loss and its gradient are the fp32
  run's within bf16 tolerances, and differ from it (bf16 is really used)."""
  config, params, rest, batch, _, (want, want_grads, _) = dit
  _check_bf16("DiT", config, params, rest, batch, want, want_grads)


def test_mmdit_bf16_loss_and_grads_are_fp32_within_bf16_rounding():
  """The same for the MMDiT (one pre-only, dual-attention, QK-RMSNorm joint block)."""
  config = tiny_mmdit_config()
  config.mmdit.num_layers = 1
  params, rest = _init(config)
  batch = {k: jnp.asarray(v) for k, v in next(ToyTextLoader(8)).items()}
  want, want_grads, _ = _loss_grads_output(config, _graphdef(config), params, rest, batch)
  _check_bf16("MMDiT", config, params, rest, batch, want, want_grads)
