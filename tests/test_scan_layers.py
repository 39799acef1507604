"""scan_layers stores blocks stacked: the stacked state is the per-block one with a leading layer axis (same initial
values), the layouts convert exactly, the train step scans the stored stack (no stacking of block weights), and a
workdir trained scanned loads, saves and exports in the per-block layout."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import dit_jax
from dit_jax import checkpoint, kinds, parallel
from dit_jax.convert import dit_tables
from dit_jax.convert.files import export
from dit_jax.models import layers
from dit_jax.models.dit import DiTBlock
from dit_jax.train import train
from dit_jax.trainer import build_model, loss_fn, model_config
from tests.helpers.training import ToyLoader, ToyTextLoader, tiny_config, tiny_mmdit_config


def _configs():
  dit = tiny_config("flow", steps=2)
  dit.model.depth = 3
  mmdit = tiny_mmdit_config(steps=2)
  mmdit.mmdit.update(num_layers=5, dual_attention_layers=(0, 1))  # runs: 2 dual, 2 plain, the pre-only block
  return {"dit": dit, "mmdit": mmdit}


def _scanned(config):
  scan = config.copy_and_resolve_references()
  scan.scan_layers = True
  return scan


def _flat(state) -> dict:
  return {path: np.asarray(var[...]) for path, var in nnx.to_flat_state(state)}


@pytest.mark.parametrize("name", ["dit", "mmdit"])
def test_stacked_state_is_the_per_block_state_with_a_layer_axis(name):
  config = _configs()[name]
  kind, cfg = kinds.get(config.model.kind), model_config(config)
  per_block = nnx.state(build_model(config, nnx.Rngs(3)))
  stacked = nnx.state(build_model(_scanned(config), nnx.Rngs(3)))
  runs = (cfg.depth,) if name == "dit" else (2, 2, 1)
  blocks = "blocks" if name == "dit" else "joint_blocks"
  assert len(stacked[blocks]) == len(runs)
  for r, n in enumerate(runs):
    if n > 1:
      assert all(leaf.shape[0] == n for leaf in jax.tree.leaves(stacked[blocks][r]["layer"]))
    else:
      assert "layer" not in stacked[blocks][r]
  fc1 = lambda state: (state[blocks][0]["layer"] if name == "dit" else state[blocks][0]["layer"]["x_block"])["mlp"]
  specs = parallel.shardings(stacked, parallel.make_mesh((1, 1, 1), jax.devices()[:1]))
  assert fc1(specs)["fc1"]["kernel"].spec[0] is None  # the layer axis is replicated
  names = fc1(stacked)["fc1"]["kernel"].get_metadata()["out_sharding"]
  assert names == (layers.LAYER_AXIS, "embed", "mlp")
  # same initial values as the per-block model; the layouts convert both ways exactly
  want, got = _flat(kind.stack_blocks(cfg, per_block)), _flat(stacked)
  assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
  back = kind.unstack_blocks(cfg, stacked)
  assert jax.tree.structure(back) == jax.tree.structure(per_block)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(per_block)))
  assert jax.tree.structure(kind.stack_blocks(cfg, back)) == jax.tree.structure(stacked)


def _eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        if hasattr(sub, "eqns"):
          yield from _eqns(sub)
        elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
          yield from _eqns(sub.jaxpr)


@pytest.mark.parametrize("name", ["dit", "mmdit"])
def test_train_step_scans_the_stored_stack(name):
  """The loss and gradient of a scanned model: a scan over the weights as stored, and no stack / concatenate
  building a stacked block weight (the old implementation stacked every block's weights in each step)."""
  config = _scanned(_configs()[name])
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0))), nnx.Param, ...)
  loader = ToyLoader(8) if name == "dit" else ToyTextLoader(8)
  batch = {k: jnp.asarray(v) for k, v in next(loader).items() if k in kinds.get(config.model.kind).batch_ndims}
  loss = lambda p, r: loss_fn(config, nnx.merge(graphdef, p, r), batch, jax.random.key(0))
  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(params, rest).jaxpr
  stacked = {tuple(leaf.shape) for path, leaf in nnx.to_flat_state(params) if "layer" in path}
  eqns = list(_eqns(jaxpr))
  built = [e for e in eqns
           if e.primitive.name in ("stack", "concatenate") and tuple(e.outvars[0].aval.shape) in stacked]
  assert stacked and not built, f"block weights stacked in the step: {[str(e.outvars[0].aval) for e in built]}"
  assert sum(e.primitive.name == "scan" for e in eqns) >= 2  # forward and backward of a stacked run


def test_scanned_training_workdir_loads_saves_and_exports_per_block(tmp):
  config = _scanned(_configs()["dit"])
  state = train(config, tmp / "w", loader=ToyLoader(8))
  assert checkpoint.read_meta(tmp / "w")["training"]["scan_layers"] is True
  graphdef, _, rest = nnx.split(build_model(config, nnx.Rngs(0)), nnx.Param, ...)
  ema = nnx.merge(graphdef, state.ema, rest)  # the scanned EMA model, as training samples it
  model = dit_jax.load(tmp / "w")
  assert len(model.blocks) == 3 and all(isinstance(block, DiTBlock) for block in model.blocks)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  t, y = jnp.array([0.0, 250.0, 500.0, 999.0]), jnp.array([0, 3, 7, 10])
  want, got = np.asarray(ema(x, t, y)), np.asarray(model(x, t, y))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
  kernel = np.asarray(state.ema["blocks"][0]["layer"]["mlp"]["fc1"]["kernel"][...])
  np.testing.assert_array_equal(model.blocks[1].mlp.fc1.kernel[...], kernel[1])
  # save of the scanned model writes the per-block layout; export reads the workdir in the torch layout
  dit_jax.save(ema, tmp / "ckpt")
  a, b = checkpoint.flat_params(dit_jax.load(tmp / "ckpt")), checkpoint.flat_params(model)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  exported = load_file(export(tmp / "w", tmp / "w.safetensors"))
  table = dit_tables.from_model(model, "original")
  assert exported.keys() == table.keys() and all(np.array_equal(exported[k], table[k]) for k in table)
  np.testing.assert_array_equal(exported["blocks.1.mlp.fc1.weight"], kernel[1].T)
