"""Training in one process: exact resume, non-finite guard, config validation, EMA export, objectives."""
from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dit_jax
from dit_jax import checkpoint
from dit_jax.train import Trainer, TrainingError, train
from dit_jax.train_config import validate
from dit_jax import parallel
from tests.helpers import REPO_ROOT
from tests.helpers.processes import one_line_error
from tests.helpers.training import ToyLoader, losses, tiny_config


@pytest.mark.parametrize("objective", ["vp"])  # 'flow' with evaluations in the loop: tests/test_train_eval.py
def test_resume_reproduces_the_uninterrupted_run(tmp, objective):
  config = tiny_config(objective, steps=6)
  train(config, tmp / "full", loader=ToyLoader(8))
  short = tiny_config(objective, steps=3)
  train(short, tmp / "resumed", loader=ToyLoader(8))
  train(config, tmp / "resumed", loader=ToyLoader(8))  # resumes from step 3
  full, resumed = losses(tmp / "full"), losses(tmp / "resumed")
  assert sorted(full) == sorted(resumed) == list(range(1, 7))
  assert full == resumed, (full, resumed)  # bitwise on CPU
  a = checkpoint.flat_params(dit_jax.load(tmp / "full"))
  b = checkpoint.flat_params(dit_jax.load(tmp / "resumed"))
  assert all(np.array_equal(a[k], b[k]) for k in a)


def test_loss_decreases_and_ema_is_exported(tmp):
  config = tiny_config("flow", steps=30)
  config.checkpoint_every_steps = 30
  state = train(config, tmp, loader=ToyLoader(8))
  curve = losses(tmp)
  assert np.mean([curve[s] for s in range(26, 31)]) < np.mean([curve[s] for s in range(1, 6)])
  model = dit_jax.load(tmp)  # EMA weights of the latest checkpoint
  ema = jax.tree.leaves(state.ema)
  np.testing.assert_array_equal(model.blocks[0].mlp.fc1.kernel[...], state.ema["blocks"][0]["mlp"]["fc1"]["kernel"][...])
  assert len(ema) == len(jax.tree.leaves(state.params))


def test_nonfinite_updates_are_skipped_then_training_aborts(tmp):
  config = tiny_config("flow", steps=20)
  config.nonfinite_abort_after = 3
  config.checkpoint_every_steps = 1
  with pytest.raises(TrainingError, match="3 consecutive non-finite updates at step 7"):
    train(config, tmp, loader=ToyLoader(8, nan_from=4))
  curve = losses(tmp)
  assert all(np.isfinite(curve[s]) for s in (1, 2, 3, 4)) and np.isnan(curve[5])
  model = dit_jax.load(tmp)
  leaves = jax.tree.leaves(checkpoint.flat_params(model))
  assert all(np.isfinite(leaf).all() for leaf in leaves), "a non-finite update reached the checkpoint"
  trainer = Trainer(config, parallel.make_mesh((1, 1, 1), jax.devices()[:1]))
  state, rest = trainer.init()
  before = jax.tree.map(np.asarray, state.params)
  state, metrics = trainer.step(state, rest, next(ToyLoader(8, nan_from=0)))
  assert float(metrics["finite"]) == 0.0 and int(state.nonfinite_total) == 1 and int(state.step) == 1
  assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)))


def test_unknown_or_bad_config_values_are_rejected():
  config = tiny_config()
  with config.unlocked():
    config.optimizer.learning_rate = 1.0
  with pytest.raises(ValueError, match="unknown config key 'optimizer.learning_rate'"):
    validate(config)
  bad = tiny_config("vp")
  bad.model.learn_sigma = False
  with pytest.raises(ValueError, match="needs model.learn_sigma"):
    validate(bad)


@pytest.mark.parametrize("override,fragment", [
    ("--config.optimizer.learning_rate=1", "learning_rate"),
    ("--config.objective=score", "objective 'score'"),
])
def test_train_cli_one_line_errors(tmp, override, fragment):
  result = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "--config", str(REPO_ROOT / "configs/demo.py"),
                           "--workdir", str(tmp / "w"), override], capture_output=True, text=True, cwd=REPO_ROOT)
  one_line_error(result.returncode, result.stderr, fragment)


def test_grad_accumulation_and_bf16_run(tmp):
  config = tiny_config("vp", steps=2)
  config.grad_accum_steps = 2
  config.compute_dtype = "bfloat16"
  config.remat = "full"
  config.scan_layers = True
  state = train(config, tmp, loader=ToyLoader(8))
  assert int(state.step) == 2 and all(v.dtype == jnp.float32 for v in jax.tree.leaves(state.params))
  assert all(np.isfinite(v) for v in losses(tmp).values())


class _CountingLoader(ToyLoader):
  """ToyLoader that notes, at each batch, how many device->host reads (jax.Array._value) happened so far."""

  def __init__(self, *a, **k):
    super().__init__(*a, **k)
    self.reads_at = []

  def __next__(self):
    self.reads_at.append(_CountingLoader.reads)
    return super().__next__()


def test_host_reads_only_at_log_steps_and_the_guard_stays_exact(tmp, monkeypatch):
  """Steps between reads (log every 4, checkpoint every 8) make no device->host transfer; a run of 3 non-finite
  updates reaching the limit at step 7 stops training at the next read (step 8) naming step 7, without saving."""
  from jax._src import array

  _CountingLoader.reads = 0
  value = array.ArrayImpl._value

  def counted(self):
    _CountingLoader.reads += 1
    return value.fget(self)

  monkeypatch.setattr(array.ArrayImpl, "_value", property(counted))
  config = tiny_config("flow", steps=12)
  config.update(log_every_steps=4, checkpoint_every_steps=8, nonfinite_abort_after=3)
  loader = _CountingLoader(8, nan_from=4)  # steps 5, 6, 7 are non-finite
  with pytest.raises(TrainingError, match=r"^3 consecutive non-finite updates at step 7; stopping"):
    train(config, tmp, loader=loader)
  during = {s: b - a for s, (a, b) in enumerate(zip(loader.reads_at, loader.reads_at[1:]), start=1)}
  assert [s for s, n in during.items() if n] == [4], during  # step 8 raised before the next batch
  assert sorted(losses(tmp)) == [4, 8]
  assert not [p for p in tmp.glob("checkpoints/*") if p.name.isdigit()], "saved after the guard's limit"
