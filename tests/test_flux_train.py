"""FLUX.1 training: the rectified-flow loss in the flux convention (model time = sigma) with the resolution-dependent
shift, condition dropout and the guidance input (fixed or per-example uniform), 8-device equality over three
meshes, a loss that falls on a fixed batch (scan_layers, remat, grad accumulation, checkpoint and load), and
one-line config errors."""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dit_jax
from dit_jax import checkpoint, kinds, parallel
from dit_jax.models.flux import Flux
from dit_jax.train import train
from dit_jax.train_config import validate
from dit_jax.trainer import Trainer, build_model, loss_fn
from tests.helpers.processes import run_on_devices
from tests.helpers.training import ToyTextLoader, tiny_flux_config


def _randomized(config) -> tuple[nnx.GraphDef, nnx.State]:
  """A tiny FLUX with random weights, nothing zero (so every input matters): matrices N(0, 1 / fan_in), vectors
  N(0, 0.05^2); drawn on the host (initialising in jax would compile every initialiser)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  std = lambda v: v.shape[0] ** -0.5 if v.ndim == 2 else 0.05
  return graphdef, jax.tree.map(lambda v: jnp.asarray(std(v) * rng.standard_normal(v.shape), v.dtype), state)


def test_loss_is_flux_rectified_flow_with_resolution_shift_guidance_and_dropout():
  configs = {"range": tiny_flux_config(), "fixed": tiny_flux_config(), "dropped": tiny_flux_config()}
  for c in configs.values():
    c.cond_dropout_prob = 0.0
  configs["fixed"].flux.update(guidance_range=(), guidance=2.0)
  configs["dropped"].flux.update(guidance_range=(), guidance=2.0)
  configs["dropped"].cond_dropout_prob = 1.0
  graphdef, state = _randomized(configs["range"])
  batch = {k: jnp.asarray(v) for k, v in next(ToyTextLoader(8)).items()}
  zeroed = {**batch, "context": jnp.zeros_like(batch["context"]), "pooled": jnp.zeros_like(batch["pooled"])}
  key = jax.random.key(0)

  @jax.jit
  def losses(state):
    model = nnx.merge(graphdef, state)
    out = {name: loss_fn(c, model, batch, key) for name, c in configs.items()}
    out["fixed_zeroed"] = loss_fn(configs["fixed"], model, zeroed, key)
    # spelled out: sigma ~ logit-normal shifted by e^mu, mu = 0.5 + 0.65 (16 - 256) / 3840 for 16 tokens;
    # x = (1 - s) x0 + s n; the model reads t = sigma and g ~ U(1, 5); the target is v = n - x0
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    g = jax.random.uniform(jax.random.split(k_drop)[1], (8,), jnp.float32, 1.0, 5.0)
    x0 = batch["image"]
    noise = jax.random.normal(k_noise, x0.shape)
    shift = math.exp(0.5 + 0.65 * (16 - 256) / 3840)
    s = jax.nn.sigmoid(jax.random.normal(k_t, (8,)))
    s = shift * s / (1 + (shift - 1) * s)
    x = (1 - s)[:, None, None, None] * x0 + s[:, None, None, None] * noise
    out["want"] = jnp.mean((model(x, s, batch["context"], batch["pooled"], g) - (noise - x0)) ** 2)
    return out

  out = {k: float(v) for k, v in losses(state).items()}
  got, want = out["range"], out["want"]
  assert abs(got - want) <= 1e-5 * want, f"loss {got} vs spelled-out FLUX flow loss {want}"
  # the guidance input matters; dropout zeroes context and pooled together
  assert abs(out["fixed"] - got) > 1e-4 * got, out
  assert out["dropped"] == out["fixed_zeroed"] and abs(out["dropped"] - out["fixed"]) > 1e-4 * out["fixed"], out


class RepeatLoader(ToyTextLoader):
  """The same class-token batch every step (labels 0..7), for a loss that must fall."""

  def __next__(self):
    self.pos = 0
    return super().__next__()


def test_loss_falls_on_a_fixed_batch_with_scan_remat_accumulation_and_loads_as_flux(tmp):
  config = tiny_flux_config(steps=60)
  config.update(scan_layers=True, remat="full", grad_accum_steps=2, ema_decay=0.0, checkpoint_every_steps=60,
                log_every_steps=60, sample_every_steps=60)
  config.sample.update(method="euler", steps=2, num=2)
  config.optimizer.update(lr=3e-3, warmup_steps=0)
  mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
  trained = train(config, tmp, loader=RepeatLoader(8), mesh=mesh)
  model = dit_jax.load(tmp)  # EMA (decay 0: the last parameters), blocks unstacked from the scan layout
  assert isinstance(model, Flux) and model.config.guidance_embeds and not model.scan_layers
  want = kinds.get("flux").unstack_blocks(model.config, trained.ema)
  np.testing.assert_array_equal(model.single_blocks[0].linear1.kernel[...],
                                want["single_blocks"][0]["linear1"]["kernel"][...])
  meta = checkpoint.read_meta(tmp)
  assert meta["kind"] == "flux" and meta["training"]["conditioning"]["kind"] == "class_tokens"
  assert meta["training"]["flow_resolution_shift"] and (tmp / "samples" / "0000060.png").is_file()  # the grid
  # the initial model predicts zero velocity (its final layer starts at zero): compare with that loss
  batch = {k: jnp.asarray(v) for k, v in next(RepeatLoader(8)).items()}
  graphdef, state = nnx.split(model)
  keys = jax.random.split(jax.random.key(1), 4)
  after = float(jnp.mean(jax.jit(lambda s: jax.lax.map(
      lambda k: loss_fn(config, nnx.merge(graphdef, s), batch, k), keys))(state)))
  noise = jax.vmap(lambda k: jax.random.normal(jax.random.split(k, 3)[1], batch["image"].shape))(keys)
  before = float(jnp.mean((noise - batch["image"]) ** 2))
  assert after < 0.6 * before, f"loss on the training batch {before:.4f} (zero velocity) -> {after:.4f} after 60 steps"


@pytest.mark.parametrize("change,fragment", [
    (lambda c: setattr(c.flow, "convention", "sd3"), "objective 'flow' and flow.convention 'flux'"),
    (lambda c: setattr(c, "objective", "vp"), "objective 'flow' and flow.convention 'flux'"),
    (lambda c: setattr(c.data, "conditioning", "label"), "model.kind 'flux' needs data.conditioning"),
    (lambda c: setattr(c, "cond_dropout_prob", -0.1), "cond_dropout_prob -0.1"),
    (lambda c: setattr(c.flux, "guidance_range", (5.0, 1.0)), r"flux.guidance_range \[5.0, 1.0\] must be"),
    (lambda c: setattr(c.flux, "guidance_range", (1.0, 2.0, 3.0)), "must be \\(\\) or \\(lo, hi\\)"),
    (lambda c: setattr(c.flux, "guidance_embeds", False), "flux.guidance_range needs flux.guidance_embeds"),
    (lambda c: setattr(c.flux, "guidance", -1.0), "flux.guidance -1.0 must be >= 0"),
    (lambda c: setattr(c.flux, "sample_size", 7), "flux.sample_size 7 must be positive and even"),
    (lambda c: (setattr(c, "sample_every_steps", 5), setattr(c.sample, "method", "ddpm")),
     "FLUX sample grids use one of euler"),
    (lambda c: setattr(c.flow, "shift", 3.0), "flow.resolution_shift replaces flow.shift"),
    (lambda c: setattr(c.flux, "in_channels", 6), "invalid FLUX config: in_channels 6"),
    (lambda c: setattr(c.flux, "axes_dims_rope", (4, 4, 4)), "axes_dims_rope \\[4, 4, 4\\] must be"),
])
def test_bad_flux_configs_are_one_line_errors(change, fragment):
  config = tiny_flux_config()
  validate(config)
  change(config)
  with pytest.raises(ValueError, match=fragment) as e:
    validate(config)
  assert "\n" not in str(e.value)


def test_unknown_flux_key_and_example_batch():
  config = tiny_flux_config()
  with config.unlocked():
    config.flux.heads = 2
  with pytest.raises(ValueError, match="unknown config key 'flux.heads'"):
    validate(config)
  batch = kinds.get("flux").example_batch(tiny_flux_config(), 4)
  assert {k: v.shape for k, v in batch.items()} == {"image": (4, 8, 8, 1), "context": (4, 512, 16), "pooled": (4, 8)}


MESH_SCRIPT = """
    from tests.helpers.training import ToyTextLoader
    from tests.helpers.training import tiny_flux_config
    def params_after_3_steps(mesh):
        trainer = Trainer(tiny_flux_config(steps=3), mesh)
        state, rest = jax.device_put(initial, (trainer.state_shardings, trainer.rest_shardings))  # one init compile
        loader, losses = ToyTextLoader(8), []
        for _ in range(3):
            state, metrics = trainer.step(state, rest, next(loader))
            losses.append(float(metrics["loss"]))
        return [np.asarray(x) for x in jax.tree.leaves(state.params)], state, losses
    initial = jax.device_get(Trainer(tiny_flux_config(), parallel.make_mesh((1, 1, 1), jax.devices()[:1])).init())
    single, _, single_losses = params_after_3_steps(parallel.make_mesh((1, 1, 1), jax.devices()[:1]))
    scale = max(float(np.abs(b).max()) for b in single)
    for shape in [(8, 1, 1), (1, 8, 1), (2, 2, 2)]:
        params, state, losses = params_after_3_steps(parallel.make_mesh(shape))
        sharded = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))
        err = max(float(np.abs(a - b).max()) for a, b in zip(params, single)) / scale
        loss_err = max(abs(a - b) / abs(b) for a, b in zip(losses, single_losses))
        print(json.dumps({"shape": shape, "rel_err": err, "loss_rel_err": loss_err, "sharded_params": sharded}))
        assert shape == (8, 1, 1) or sharded > 0, "fsdp/tensor meshes must shard parameters"
"""


def test_flux_meshes_match_single_device():
  out = run_on_devices(MESH_SCRIPT, 8).stdout
  rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  print(rows)
  assert len(rows) == 3 and all(r["rel_err"] < 1e-5 and r["loss_rel_err"] < 1e-5 for r in rows), rows
