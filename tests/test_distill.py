"""Distillation objectives from one tiny rectified-flow teacher. Guidance distillation: the zero-initialised
guidance input (a student made from the teacher is the conditional teacher exactly), the loss is 0 for a student
that is the teacher's CFG combination, training resumes bitwise, sampling with guidance= runs one model call per
step. MeanFlow: the interval input is silent at start, training (teacher and data velocities) resumes bitwise,
1- and 2-step sampling. LADD: teacher token features, one step updates the student and the discriminator, training
(two optimizers in one checkpoint) resumes bitwise, 8 simulated devices match one, an MMDiT student, few-step
sampling. One-line errors."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dit_jax
from dit_jax import checkpoint, kinds, parallel
from dit_jax.diffusion.samplers import few_step_sigmas
from dit_jax.distill.guidance import guidance_distillation_loss
from dit_jax.models.layers import unpatchify
from dit_jax.train import train
from dit_jax.train_config import validate
from dit_jax.trainer import Trainer
from tests.helpers.processes import main_in_process, run_on_devices
from tests.helpers.training import ToyLoader, ToyTextLoader, losses, tiny_config, tiny_mmdit_config


def student_config(teacher_dir, steps=4, objective="guidance_distill"):
  c = tiny_config("flow", steps=steps)
  c.objective = objective
  c.teacher.checkpoint = str(teacher_dir)
  if objective == "guidance_distill":
    c.model.guidance_embed = True
    c.distill.guidance_range = (1.0, 3.0)
  elif objective == "ladd":
    c.distill.ladd.update(head_channels=32, cmap_dim=16)
  else:
    c.model.interval_embed = True
    c.distill.meanflow.update(velocity="teacher", guidance=2.0)
  return c


def sample_cli(run, capsys, tmp, *flags) -> None:
  """sample.py on a distilled workdir writes its grid: with no method (the objective's default) and per preset."""
  for i, extra in enumerate([[], *[["--preset", f"digits_students:{f}"] for f in flags]]):
    out = tmp / f"grid{i}.png"
    code, err = main_in_process("sample.py", ["--checkpoint", run, "--class-labels", "0,1", "--out", out, *extra],
                                capsys)
    assert code == 0 and out.is_file(), (extra, err[-2000:])


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


def test_training_resumes_bitwise_and_samples_with_guidance(teacher, tmp, capsys):
  resume_matches(lambda steps: student_config(teacher, steps), tmp)
  sample_cli(tmp / "full", capsys, tmp, "guidance")
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


def test_meanflow_student_starts_as_the_teacher_and_samples_in_one_and_two_steps(teacher, tmp, capsys):
  """Teacher velocity (CFG 2): resumes bitwise; before training the 1-step MeanFlow sample of a student made from
  the teacher equals the teacher's 1-step Euler sample (u = v when the interval input is silent)."""
  run = resume_matches(lambda steps: student_config(teacher, steps, "meanflow"), tmp)
  sample_cli(run, capsys, tmp, "meanflow_2")
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


# LADD


def test_teacher_features_are_the_block_outputs(teacher):
  """features() returns the blocks' token outputs in the order asked: the last block's, through the final layer,
  is the model's output exactly (DiT; MMDiT: run_blocks' image tokens)."""
  model = dit_jax.load(teacher)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((4, 8, 8, 1)), jnp.float32)
  t, y = jnp.asarray([0.1, 0.4, 0.7, 0.9]), jnp.asarray([0, 3, 7, 10])
  last, first = model.features(x, t, y, (1, 0))
  cfg = model.config
  out = unpatchify(model.final_layer(last, model.condition(t, y)), cfg.patch_size, cfg.out_channels, 4, 4)
  assert np.array_equal(np.asarray(out), np.asarray(model(x, t, y)))
  assert np.array_equal(np.asarray(first), np.asarray(model.features(x, t, y, (0,))[0]))
  with pytest.raises(ValueError, match=r"feature blocks \[2\] must be block indices in 0..1"):
    model.features(x, t, y, (2,))

  mm = dit_jax.MMDiT(kinds.get("mmdit").model_config(tiny_mmdit_config()), rngs=nnx.Rngs(0))
  context, pooled = jnp.asarray(rng.standard_normal((4, 3, 16)), jnp.float32), jnp.ones((4, 8))
  tokens, _ = mm.embed(x)
  want, _ = mm.run_blocks(tokens, mm.context_embedder(context), mm.condition(1000 * t, pooled))
  got = mm.features(x, 1000 * t, context, pooled, (1,))[0]
  assert np.array_equal(np.asarray(got), np.asarray(want))


def test_ladd_step_updates_the_student_and_the_discriminator(teacher):
  config = student_config(teacher, objective="ladd")
  config.optimizer.warmup_steps = 0  # else the student's first learning rate is 0
  trainer = Trainer(config, parallel.make_mesh((1, 1, 1), jax.devices()[:1]))
  state, rest = trainer.init()
  assert len(state.aux_params["heads"]) == 2  # default layers: the middle and last, blocks 0 and 1 of 2
  before = jax.device_get((state.params, state.aux_params))
  teacher_params = checkpoint.flat_params(dit_jax.load(teacher))
  assert all(np.array_equal(np.asarray(v[...]), teacher_params[k]) for k, v in nnx.to_flat_state(before[0]))
  state, metrics = trainer.step(state, rest, next(ToyLoader(8)))
  metrics = jax.device_get(metrics)
  assert all(np.isfinite(metrics[k]) for k in ("loss", "g_loss", "d_loss", "r1", "aux_grad_norm"))
  assert metrics["finite"] == 1.0 and metrics["loss"] == metrics["g_loss"] and metrics["r1"] >= 0
  # the heads' logits start near 0: hinge d_loss ~ 2 per head, 2 heads
  assert 3.0 < metrics["d_loss"] < 5.0, metrics
  changed = lambda a, b: any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  after = jax.device_get((state.params, state.aux_params))
  assert changed(before[0], after[0]) and changed(before[1], after[1])
  # a non-finite batch leaves both networks as they were and is counted
  state, metrics = trainer.step(state, rest, next(ToyLoader(8, nan_from=0)))
  assert jax.device_get(metrics["finite"]) == 0.0 and int(state.nonfinite_total) == 1
  assert not changed(after, jax.device_get((state.params, state.aux_params)))


def test_ladd_resumes_bitwise_and_samples_in_few_steps(teacher, tmp, capsys):
  run = resume_matches(lambda steps: student_config(teacher, steps, "ladd"), tmp)
  sample_cli(run, capsys, tmp, "ladd_1")
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite([r["g_loss"], r["d_loss"], r["r1"]]).all() for r in rows if "loss" in r)
  student = dit_jax.load(run)
  labels, key = np.arange(4), jax.random.key(0)
  for steps in (1, 2, 4):
    out = dit_jax.sample(student, labels, key, method="few_step", steps=steps)
    assert out.shape == (4, 8, 8, 1) and np.isfinite(np.asarray(out)).all()
  # deterministic variant: Euler on (1, .75, .5, .25, 0), SiT's uniform 4-step grid
  noise = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  euler = dit_jax.sample(student, labels, noise=noise, method="euler", steps=4)
  ode = dit_jax.sample(student, labels, noise=noise, method="few_step_euler", steps=4)
  np.testing.assert_allclose(np.asarray(ode), np.asarray(euler), atol=1e-5)
  np.testing.assert_array_equal(few_step_sigmas(1), [1.0, 0.0])
  with pytest.raises(ValueError, match="needs a PRNG key"):
    dit_jax.sample(student, labels, noise=noise, method="few_step", steps=2)
  with pytest.raises(ValueError, match="takes 1..4 steps"):
    dit_jax.sample(student, labels, key, method="few_step", steps=5)


@pytest.mark.parametrize("change,fragment", [
    (lambda c: c.distill.ladd.update(layers=(0, 2)), "layers [0, 2] must be distinct teacher block indices in 0..1"),
    (lambda c: c.distill.ladd.update(probs=(0.5, 0.1, 0.1, 0.1)), "must be non-negative and sum to 1"),
    (lambda c: c.distill.ladd.update(loss="wgan"), "is not 'hinge' or 'softplus'"),
    (lambda c: c.distill.ladd.update(head_channels=20), "must be a positive multiple of head_groups"),
    (lambda c: c.model.update(guidance_embed=True), "trains a plain student"),
    (lambda c: c.teacher.update(checkpoint=""), "needs teacher.checkpoint"),
])
def test_ladd_config_errors(teacher, change, fragment):
  config = student_config(teacher, objective="ladd")
  change(config)
  with pytest.raises(ValueError) as e:
    validate(config)
  assert fragment in str(e.value) and "\n" not in str(e.value), e.value


LADD_MESH_SCRIPT = """
    teacher = sys.argv[1]

    def run(mesh, steps=3):
        config = tiny_config("flow", steps=steps)
        config.objective = "ladd"
        config.teacher.checkpoint = teacher
        config.distill.ladd.update(head_channels=32, cmap_dim=16)
        # Adam turns the rounding noise of exactly-zero gradients (a conv bias that a one-channel GroupNorm
        # cancels) into steps of +-lr, differently on each mesh (1e-5 apart at eps 1e-8); eps 1e-6 damps that
        config.optimizer.eps = 1e-6
        trainer = Trainer(config, mesh)
        state, rest = trainer.init()
        loader, out = ToyLoader(8), []
        for _ in range(steps):
            state, m = trainer.step(state, rest, next(loader))
            out.append([float(m[k]) for k in ("g_loss", "d_loss", "r1")])
        return [np.asarray(x) for x in jax.tree.leaves((state.params, state.aux_params))], np.asarray(out), state

    single, single_losses, _ = run(parallel.make_mesh((1, 1, 1), jax.devices()[:1]))
    scale = max(float(np.abs(b).max()) for b in single)
    for shape in [(8, 1, 1), (2, 2, 2)]:
        params, got, state = run(parallel.make_mesh(shape))
        sharded = sum(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
                      for x in jax.tree.leaves(state.aux_params))
        err = max(float(np.abs(a - b).max()) for a, b in zip(params, single)) / scale
        loss_err = float((np.abs(got - single_losses) / np.maximum(np.abs(single_losses), 1)).max())
        print(json.dumps({"shape": shape, "rel_err": err, "loss_err": loss_err, "sharded_aux": sharded}))
        assert err < 1e-6 and loss_err < 1e-6, (shape, err, loss_err)
        assert shape == (8, 1, 1) or sharded > 0, "fsdp/tensor meshes must shard the discriminator"
"""


@pytest.mark.slow
def test_ladd_on_8_devices_matches_one(teacher):
  """Student and discriminator parameters (relative to the largest) and the losses of 3 steps on meshes (8,1,1)
  and (2,2,2) equal one device's within 1e-6 (about 4 minutes on 2 busy cores)."""
  out = run_on_devices(LADD_MESH_SCRIPT, 8, teacher).stdout
  assert out.count("rel_err") == 2, out


@pytest.mark.slow
def test_ladd_mmdit_student(tmp):
  """An MMDiT teacher (class tokens) and its LADD student (discriminator on pooled vectors): finite losses, the
  student samples in 2 steps."""
  train(tiny_mmdit_config(steps=2), tmp / "teacher", loader=ToyTextLoader(8))
  config = tiny_mmdit_config(steps=2)
  config.objective = "ladd"
  config.teacher.checkpoint = str(tmp / "teacher")
  config.distill.ladd.update(head_channels=32, cmap_dim=16, layers=(1,))
  train(config, tmp / "student", loader=ToyTextLoader(8))
  rows = [json.loads(line) for line in (tmp / "student" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["d_loss"]) for r in rows)
  student = dit_jax.load(tmp / "student")
  cond = {"context": np.ones((2, 3, 16), np.float32), "pooled": np.ones((2, 8), np.float32)}
  out = dit_jax.sample(student, cond, jax.random.key(0), method="few_step", steps=2)
  assert out.shape == (2, 8, 8, 1) and np.isfinite(np.asarray(out)).all()
