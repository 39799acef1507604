"""Teacher samples as distillation data (dit_jax.distill.teacher_data), from a tiny DiT teacher with random weights:
the stored samples are the teacher's own ``dit_jax.sample`` from the same noise, the training loader reads them
(labels cycled, no flips), an interrupted generation resumes to the same bytes, a complete directory is reused, a
directory of another teacher or other settings is refused untouched, a LADD run on teacher samples resumes
bitwise, config errors."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dit_jax
from dit_jax import checkpoint, data, kinds, parallel
from dit_jax.data.latents import LatentSource
from dit_jax.distill import teacher_data
from dit_jax.distill.teacher import Teacher
from dit_jax import train as train_module
from dit_jax.train import train
from dit_jax.train_config import validate
from tests.helpers.training import losses, tiny_config, tiny_mmdit_config


def save_random_teacher(path, seed: int = 0):
  """A tiny flow DiT whose every parameter is drawn N(0, 0.1^2) (adaLN-Zero would start it at 0), saved."""
  model = dit_jax.DiT(kinds.get("dit").model_config(tiny_config("flow")), rngs=nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng(seed)
  flat = {p: v.replace(jnp.asarray(0.1 * rng.standard_normal(v.shape), v.dtype))
          for p, v in nnx.to_flat_state(params)}
  checkpoint.save(nnx.merge(graphdef, nnx.from_flat_state(flat), rest), path)
  return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  return save_random_teacher(tmp_path_factory.mktemp("teacher") / "teacher")


def config_of(teacher, steps: int = 4, method: str = "euler"):
  """LADD on 18 teacher samples: shards of 8 (8, 8, 2), sampler calls of 4 (the last one padded)."""
  c = tiny_config("flow", steps=steps)
  c.objective = "ladd"
  c.teacher.checkpoint = str(teacher)
  c.distill.ladd.update(head_channels=32, cmap_dim=16)
  c.distill.teacher_data.update(num_samples=18, shard_size=8, batch_size=4)
  c.distill.teacher_data.sample.update(method=method, steps=3, cfg_scale=2.0)
  return c


def mesh_and_teacher(config):
  mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
  return mesh, Teacher.load(config, kinds.get("dit").model_config(config), mesh)


def files(root):
  return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_samples_are_the_teachers_and_the_loader_reads_them(teacher, tmp):
  config = config_of(teacher)
  mesh, t = mesh_and_teacher(config)
  manifest = teacher_data.generate(config, t, mesh, tmp / "samples")
  assert manifest["complete"] and manifest["shards_done"] == [0, 1, 2] and manifest["num_classes"] == 10
  source = LatentSource(tmp / "samples")
  model, err = dit_jax.load(teacher), 0.0
  for b, (k, start, stop) in enumerate([(0, 0, 4), (0, 4, 8), (1, 8, 12), (1, 12, 16), (2, 16, 18)]):
    noise = teacher_data.initial_noise(config.seed, np.arange(start, start + 4), (8, 8, 1))
    want = np.asarray(dit_jax.sample(model, np.arange(start, start + 4) % 10, teacher_data.batch_key(config.seed, b),
                                     method="euler", steps=3, cfg_scale=2.0, noise=noise, shift=1.0,
                                     flow_convention="sit"))[:stop - start]
    shard = source.shard(k)
    got = np.asarray(shard["mean"][start - 8 * k:stop - 8 * k])
    err = max(err, float(np.abs(got[:, 0] - want).max() / np.abs(want).max()))
    np.testing.assert_array_equal(got[:, 1], got[:, 0, :, ::-1])  # view 1: the horizontal flip
    np.testing.assert_array_equal(shard["label"][start - 8 * k:stop - 8 * k], np.arange(start, stop) % 10)
    assert not np.allclose(want, np.asarray(noise)[:stop - start], atol=1e-2)  # the teacher moved the noise
  assert err < 1e-6, f"stored samples vs the teacher sampled directly: {err:.2e}"
  assert "std" not in source.shard(0) and source.shard(2)["mean"].shape == (2, 2, 8, 8, 1)
  assert len({p.name for p in (tmp / "samples").iterdir()}) == 4  # 3 shards + the manifest, no temporaries

  config.distill.teacher_data.dir = str(tmp / "samples")  # complete: reused
  d = teacher_data.training_data(config, tmp / "run", t, mesh)
  assert (d.source, d.folder, d.random_flip) == ("latents", str(tmp / "samples"), False)
  stored = {tuple(np.asarray(source[i]["mean"][0]).ravel()): source[i]["label"] for i in range(18)}
  with data.make_loader(d, global_batch_size=8, seed=0) as loader:
    for _ in range(3):
      batch = next(loader)
      assert [stored[tuple(x.ravel())] for x in batch["image"]] == batch["label"].tolist()


def test_interrupted_generation_resumes_to_the_same_bytes_and_a_complete_one_is_reused(teacher, tmp):
  """SDE sampling (step noise from each call's key): stopped after shard 0 (and a half-written temporary left), the
  restart writes shards 1 and 2 only and ends byte-identical to an uninterrupted generation; a third call writes
  nothing."""
  config = config_of(teacher, method="sde")
  mesh, t = mesh_and_teacher(config)
  teacher_data.generate(config, t, mesh, tmp / "whole")

  def stop_after_first(k):
    raise KeyboardInterrupt(f"killed after shard {k}")

  with pytest.raises(KeyboardInterrupt):
    teacher_data.generate(config, t, mesh, tmp / "resumed", on_shard=stop_after_first)
  manifest = json.loads((tmp / "resumed" / "manifest.json").read_text())
  assert manifest["shards_done"] == [0] and not manifest["complete"]
  with pytest.raises(ValueError, match="unfinished"):
    LatentSource(tmp / "resumed")
  (tmp / "resumed" / ".shard_00001.npz.tmp-1").write_bytes(b"killed while writing")  # removed on restart
  written = []
  teacher_data.generate(config, t, mesh, tmp / "resumed", on_shard=written.append)
  assert written == [1, 2]
  assert files(tmp / "resumed") == files(tmp / "whole")
  before = {p.name: p.stat().st_mtime_ns for p in (tmp / "whole").iterdir()}
  teacher_data.generate(config, t, mesh, tmp / "whole", on_shard=written.append)
  assert written == [1, 2] and before == {p.name: p.stat().st_mtime_ns for p in (tmp / "whole").iterdir()}


def test_a_directory_of_another_teacher_or_settings_is_refused(teacher, tmp):
  config = config_of(teacher)
  mesh, t = mesh_and_teacher(config)
  teacher_data.generate(config, t, mesh, tmp / "samples")
  before = files(tmp / "samples")

  def refused(config, t, fragment):
    with pytest.raises(ValueError) as e:
      teacher_data.generate(config, t, mesh, tmp / "samples")
    assert fragment in str(e.value) and "\n" not in str(e.value), e.value
    assert files(tmp / "samples") == before

  other = config_of(teacher)
  other.distill.teacher_data.sample.cfg_scale = 3.0
  refused(other, t, "holds samples of another teacher or other settings (generation.cfg_scale 2.0 there, 3.0 here)")
  other = config_of(teacher)
  other.seed = 1
  refused(other, t, "generation.seed 0 there, 1 here")
  other_teacher = config_of(save_random_teacher(tmp / "other", seed=1))
  refused(other_teacher, mesh_and_teacher(other_teacher)[1], "(teacher.fingerprint ")
  (tmp / "latents").mkdir()
  (tmp / "latents" / "manifest.json").write_text(json.dumps({"format": "dit_jax.latents/1"}))
  with pytest.raises(ValueError, match="is not a teacher-sample directory"):
    teacher_data.generate(config, t, mesh, tmp / "latents")


def test_ladd_on_teacher_samples_resumes_bitwise(teacher, tmp, monkeypatch):
  """4 steps, and 2 then resumed to 4, each run sampling into <workdir>/teacher_samples (the resumed run reuses
  its directory): equal losses and parameters, equal sample directories."""
  monkeypatch.setattr(train_module, "peak_flops", lambda *_: 1.0)  # MFU's matmul timing: seconds per run here
  full, short = config_of(teacher, 4), config_of(teacher, 2)
  for c in (full, short):
    c.checkpoint_every_steps = 2
  train(full, tmp / "full")
  train(short, tmp / "resumed")
  train(full, tmp / "resumed")
  a, b = losses(tmp / "full"), losses(tmp / "resumed")
  assert sorted(a) == [1, 2, 3, 4] and a == b and all(np.isfinite(list(a.values()))), (a, b)
  pa, pb = checkpoint.flat_params(dit_jax.load(tmp / "full")), checkpoint.flat_params(dit_jax.load(tmp / "resumed"))
  assert all(np.array_equal(pa[k], pb[k]) for k in pa)
  assert files(tmp / "full" / "teacher_samples") == files(tmp / "resumed" / "teacher_samples")


def test_mmdit_teacher_samples_on_class_tokens_and_text_rows(tmp):
  """An MMDiT teacher: sample i on the class tokens of label i mod 10 (the loader adds them back from the label),
  or on text row i (N must equal the rows); each equals the teacher's own sample."""
  config = tiny_mmdit_config()
  config.objective = "ladd"
  model = dit_jax.MMDiT(kinds.get("mmdit").model_config(config), rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng(0)
  params = nnx.from_flat_state({p: v.replace(jnp.asarray(0.1 * rng.standard_normal(v.shape), v.dtype))
                                for p, v in nnx.to_flat_state(params)})
  model = nnx.merge(graphdef, params, rest)
  checkpoint.save(model, tmp / "teacher")
  config.teacher.checkpoint = str(tmp / "teacher")
  config.distill.teacher_data.update(num_samples=6, shard_size=4, batch_size=4)
  config.distill.teacher_data.sample.update(steps=2, cfg_scale=2.0)
  mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
  t = Teacher.load(config, kinds.get("mmdit").model_config(config), mesh)
  tokens = data.ClassTokens(10, 3, 16, 8, seed=0)
  rows = {"context": rng.standard_normal((6, 3, 16)).astype(np.float32),
          "pooled": rng.standard_normal((6, 8)).astype(np.float32)}
  data.write_text_embedding_shards(tmp / "text", rows["context"], rows["pooled"], shard_size=4)
  for conditioning, cond in (("class_tokens", tokens(np.arange(4))), ("text", {k: v[:4] for k, v in rows.items()})):
    config.data.update(conditioning=conditioning, text_folder=str(tmp / "text"))
    config.distill.teacher_data.dir = str(tmp / f"samples-{conditioning}")
    d = teacher_data.training_data(config, tmp, t, mesh)
    want = dit_jax.sample(model, cond, teacher_data.batch_key(0, 0), method="euler", steps=2, cfg_scale=2.0,
                          noise=teacher_data.initial_noise(0, np.arange(4), (8, 8, 1)), shift=3.0)
    got = LatentSource(tmp / f"samples-{conditioning}").shard(0)["mean"][:, 0]
    err = float(np.abs(got - np.asarray(want)).max() / np.abs(np.asarray(want)).max())
    assert err < 1e-6, f"{conditioning}: stored samples vs the teacher sampled directly: {err:.2e}"
    d.shuffle = False
    with data.make_loader(d, global_batch_size=2, seed=0, context_dim=16, pooled_dim=8) as loader:
      batch = next(loader)
    np.testing.assert_array_equal(batch["image"], got[:2])
    np.testing.assert_array_equal(batch["context"], cond["context"][:2])
  config.distill.teacher_data.update(num_samples=5, dir=str(tmp / "five"))
  with pytest.raises(ValueError, match=r"num_samples 5 must equal the 6 rows of data.text_folder"):
    teacher_data.training_data(config, tmp, t, mesh)


@pytest.mark.parametrize("change,fragment", [
    (lambda c: c.update(objective="flow"), "distill.teacher_data samples a teacher: it needs a distillation"),
    (lambda c: c.teacher.update(checkpoint=""), "needs teacher.checkpoint"),
    (lambda c: c.distill.teacher_data.update(num_samples=-1), "num_samples -1 must be >= 0"),
    (lambda c: c.distill.teacher_data.update(shard_size=0), "needs shard_size > 0 (got 0)"),
    (lambda c: c.distill.teacher_data.sample.update(method="ddpm"), "'ddpm' is not one of the flow samplers"),
    (lambda c: c.distill.teacher_data.sample.update(cfg_mode="half"), "cfg_mode 'half' is not one of"),
    (lambda c: c.distill.teacher_data.sample.update(steps=0), "steps 0 must be positive"),
])
def test_config_errors(teacher, change, fragment):
  config = config_of(teacher)
  change(config)
  with pytest.raises(ValueError) as e:
    validate(config)
  assert fragment in str(e.value) and "\n" not in str(e.value), e.value
