"""Distillation objectives from one tiny rectified-flow teacher. Guidance distillation: the zero-initialised
guidance input (a student made from the teacher is the conditional teacher exactly), the loss is 0 for a student
that is the teacher's CFG combination, training resumes bitwise, sampling with guidance= runs one model call per
step. MeanFlow: the interval input is silent at start, training (teacher and data velocities) resumes bitwise,
1- and 2-step sampling. One-line errors."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dit_jax
from dit_jax import checkpoint, kinds
from dit_jax.distill.guidance import guidance_distillation_loss
from dit_jax.train import train
from dit_jax.train_config import validate
from tests.helpers.training import ToyLoader, losses, tiny_config


def student_config(teacher_dir, steps=4, objective="guidance_distill"):
  c = tiny_config("flow", steps=steps)
  c.objective = objective
  c.teacher.checkpoint = str(teacher_dir)
  if objective == "guidance_distill":
    c.model.guidance_embed = True
    c.distill.guidance_range = (1.0, 3.0)
  else:
    c.model.interval_embed = True
    c.distill.meanflow.update(velocity="teacher", guidance=2.0)
  return c


def resume_matches(config_of, tmp):
  """Train 4 steps, and 2 then resumed to 4: equal losses and parameters; returns the full run's workdir."""
  config, short = config_of(4), config_of(2)
  for c in (config, short):
    c.checkpoint_every_steps = 2
  train(config, tmp / "full", loader=ToyLoader(8))
  train(short, tmp / "resumed", loader=ToyLoader(8))
  train(config, tmp / "resumed", loader=ToyLoader(8))
  full, resumed = losses(tmp / "full"), losses(tmp / "resumed")
  assert sorted(full) == [1, 2, 3, 4] and full == resumed, (full, resumed)
  a, b = checkpoint.flat_params(dit_jax.load(tmp / "full")), checkpoint.flat_params(dit_jax.load(tmp / "resumed"))
  assert all(np.array_equal(a[k], b[k]) for k in a)
  return tmp / "full"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """A tiny rectified-flow DiT trained 6 steps (a workdir: its EMA is the teacher)."""
  tmp = tmp_path_factory.mktemp("teacher")
  train(tiny_config("flow", steps=6), tmp / "teacher", loader=ToyLoader(8))
  return tmp / "teacher"


def test_student_starts_as_the_conditional_teacher(teacher):
  model = dit_jax.load(teacher)
  cfg = dataclasses.replace(model.config, guidance_embed=True)
  student = dit_jax.DiT(cfg, rngs=nnx.Rngs(3))
  from dit_jax.distill.teacher import init_from_teacher

  graphdef, params, rest = nnx.split(student, nnx.Param, ...)
  student = nnx.merge(graphdef, init_from_teacher(params, nnx.state(model, nnx.Param)), rest)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 8, 8, 1)), jnp.float32)
  t, y = jnp.asarray([0.1, 0.4, 0.7, 0.9]), jnp.asarray([0, 3, 7, 10])
  want = model(x, t, y)
  for g in (1.0, 4.5):
    got = student(x, t, y, guidance=jnp.full((4,), g))
    assert np.array_equal(np.asarray(got), np.asarray(want)), f"g={g}: {np.abs(got - want).max():.2e}"
  assert not np.any(np.asarray(student.guidance_embedder.fc2.kernel[...]))


def test_loss_is_zero_for_the_teachers_cfg_combination(teacher):
  """A 'student' whose guided output is u + g (c - u) of the teacher itself has loss exactly 0; the
  conditional teacher (g ignored) has a positive loss."""
  model = dit_jax.load(teacher)
  config = student_config(teacher)
  real = kinds.get("dit")

  class CFGStudent:
    def network(self, config, m, batch, key, *, uncond=False, **inputs):
      if m is not student:
        return real.network(config, m, batch, key, uncond=uncond)
      c, u = (real.network(config, model, batch, None, uncond=flag) for flag in (False, True))
      g = inputs["guidance"][:, None, None, None]
      return lambda x, t: u(x, t) + g * (c(x, t) - u(x, t))

  student = object()
  rng = np.random.default_rng(1)
  batch = {"image": jnp.asarray(rng.uniform(-1, 1, (8, 8, 8, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, 8), jnp.int32)}
  key = jax.random.key(0)
  assert float(guidance_distillation_loss(config, CFGStudent(), student, model, batch, key)) == 0.0

  class Conditional(CFGStudent):
    def network(self, config, m, batch, key, *, uncond=False, **inputs):
      return real.network(config, model, batch, key, uncond=uncond)

  assert float(guidance_distillation_loss(config, Conditional(), student, model, batch, key)) > 0.0


def test_training_resumes_bitwise_and_samples_with_guidance(teacher, tmp):
  resume_matches(lambda steps: student_config(teacher, steps), tmp)
  student = dit_jax.load(tmp / "full")
  assert student.config.guidance_embed and np.any(np.asarray(student.guidance_embedder.fc2.kernel[...]))
  labels = np.arange(4)
  out = dit_jax.sample(student, labels, jax.random.key(0), method="euler", steps=3, guidance=2.0)
  assert out.shape == (4, 8, 8, 1) and np.isfinite(np.asarray(out)).all()
  with pytest.raises(ValueError, match="guidance-distilled: pass guidance=g"):
    dit_jax.sample(student, labels, jax.random.key(0), method="euler", steps=3)
  with pytest.raises(ValueError, match="guided with cfg_scale"):
    dit_jax.sample(dit_jax.load(teacher), labels, jax.random.key(0), method="euler", steps=3, guidance=2.0)


@pytest.mark.parametrize("change,fragment", [
    (lambda c: c.model.update(guidance_embed=False), "needs a student with a guidance input"),
    (lambda c: c.teacher.update(checkpoint=""), "needs teacher.checkpoint"),
    (lambda c: c.distill.update(guidance_range=(3.0, 1.0)), "must be (lo, hi), 0 <= lo <= hi"),
    (lambda c: c.update(objective="meanflow"), "needs a student with an interval input"),
    (lambda c: (c.update(objective="meanflow"), c.model.update(interval_embed=True),
                c.distill.meanflow.update(velocity="teacher"), c.teacher.update(checkpoint="")), "needs teacher"),
])
def test_config_errors(teacher, change, fragment):
  config = student_config(teacher)
  change(config)
  with pytest.raises(ValueError, match=None) as e:
    validate(config)
  assert fragment in str(e.value) and "\n" not in str(e.value), e.value


def test_teacher_of_another_shape_is_refused(teacher, tmp):
  config = student_config(teacher)
  config.model.hidden_size = 64
  with pytest.raises(ValueError, match="differ: hidden_size 32 vs 64"):
    train(config, tmp / "run", loader=ToyLoader(8))


def test_meanflow_student_starts_as_the_teacher_and_samples_in_one_and_two_steps(teacher, tmp):
  """Teacher velocity (CFG 2): resumes bitwise; before training the 1-step MeanFlow sample of a student made from
  the teacher equals the teacher's 1-step Euler sample (u = v when the interval input is silent)."""
  run = resume_matches(lambda steps: student_config(teacher, steps, "meanflow"), tmp)
  student = dit_jax.load(run)
  assert student.config.interval_embed and np.any(np.asarray(student.interval_embedder.fc2.kernel[...]))
  labels, key = np.arange(4), jax.random.key(0)
  for steps in (1, 2):
    out = dit_jax.sample(student, labels, key, method="meanflow", steps=steps)
    assert out.shape == (4, 8, 8, 1) and np.isfinite(np.asarray(out)).all()
  model = dit_jax.load(teacher)
  fresh = dit_jax.DiT(dataclasses.replace(model.config, interval_embed=True), rngs=nnx.Rngs(5))
  from dit_jax.distill.teacher import init_from_teacher

  graphdef, params, rest = nnx.split(fresh, nnx.Param, ...)
  fresh = nnx.merge(graphdef, init_from_teacher(params, nnx.state(model, nnx.Param)), rest)
  one = dit_jax.sample(fresh, labels, key, method="meanflow", steps=1, cfg_scale=2.0)
  euler = dit_jax.sample(model, labels, key, method="euler", steps=1, cfg_scale=2.0)
  err = float(np.abs(np.asarray(one) - np.asarray(euler)).max() / np.abs(np.asarray(euler)).max())
  assert err < 1e-6, f"1-step MeanFlow of the initial student vs the teacher's 1-step Euler: {err:.2e}"
  with pytest.raises(ValueError, match="has no interval input"):
    dit_jax.sample(model, labels, key, method="meanflow", steps=1)


def test_meanflow_from_data_needs_no_teacher(tmp):
  config = tiny_config("flow", steps=2)
  config.objective = "meanflow"
  config.model.interval_embed = True
  train(config, tmp / "run", loader=ToyLoader(8))
  assert all(np.isfinite(v) for v in losses(tmp / "run").values())
