"""FID / IS in the training loop (eval_every_steps): logged under names with the sample count, equal to the same
samples scored outside the loop, and a resumed run stays bitwise equal to the uninterrupted one, FID included."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import dit_jax
from dit_jax import checkpoint
from dit_jax.eval import evaluator
from dit_jax.eval.loop import count_name
from dit_jax.eval.metrics import FeatureStats, inception_score
from dit_jax.sample_files import to_uint8
from dit_jax.train import train
from dit_jax.train_config import validate
from tests.helpers.inception_reference import frechet_by_eigh, random_inception
from tests.helpers.training import ToyLoader, losses, tiny_config


def eval_rows(workdir) -> dict[int, dict]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in rows if "loss" not in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A 4-step run evaluated at steps 2 and 4 (6 samples in batches of 4, so the last batch is padded), uninterrupted
  and stopped at step 2 then resumed; the reference batch has images only (its statistics computed in the loop)."""
  tmp = tmp_path_factory.mktemp("train_eval")
  dit_jax.save(random_inception(image_size=75), tmp / "inception")
  rng = np.random.default_rng(0)
  np.savez(tmp / "ref.npz", arr_0=rng.integers(0, 256, (12, 16, 16, 3), np.uint8))
  config = tiny_config("flow", steps=4)
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 2
  config.eval.update(num_samples=6, batch_size=4, reference=str(tmp / "ref.npz"), inception=str(tmp / "inception"))
  config.eval.sample.update(method="euler", steps=3, cfg_scale=1.5)
  train(config, tmp / "full", loader=ToyLoader(8))
  short = config.copy_and_resolve_references()
  short.total_steps = 2
  train(short, tmp / "resumed", loader=ToyLoader(8))
  train(config, tmp / "resumed", loader=ToyLoader(8))
  return tmp, config


def test_fid_is_logged_and_resume_stays_bitwise(runs):
  tmp, _ = runs
  full, resumed = eval_rows(tmp / "full"), eval_rows(tmp / "resumed")
  assert sorted(full) == [2, 4] and set(full[2]) == {"step", "FID-6", "IS-6"}, full
  assert all(np.isfinite(r["FID-6"]) and r["FID-6"] > 0 and r["IS-6"] >= 1 for r in full.values()), full
  assert full == resumed, (full, resumed)  # the evaluations too: same EMA weights, same samples
  assert losses(tmp / "full") == losses(tmp / "resumed")
  a, b = checkpoint.flat_params(dit_jax.load(tmp / "full")), checkpoint.flat_params(dit_jax.load(tmp / "resumed"))
  assert all(np.array_equal(a[k], b[k]) for k in a)


def test_logged_fid_equals_the_samples_scored_outside_the_loop(runs):
  """Step 4's samples re-made from the exported EMA model (labels cycled, key fold_in(key(seed + 1), batch)), scored
  by the evaluator's own extraction and a float64 eigh Fréchet distance."""
  tmp, config = runs
  model, inception = dit_jax.load(tmp / "full"), dit_jax.load(tmp / "inception")
  key = jax.random.key(config.seed + 1)
  images = []
  for i, begin in enumerate(range(0, 6, 4)):
    latents = dit_jax.sample(model, np.arange(begin, begin + 4) % 10, jax.random.fold_in(key, i), method="euler",
                             steps=3, cfg_scale=1.5, flow_convention="sit", shift=1.0)
    images.append(np.repeat(to_uint8(latents), 3, axis=-1))
  feats = evaluator.extract(inception, np.concatenate(images)[:6], batch_size=4)
  ref_feats = evaluator.extract(inception, np.load(tmp / "ref.npz")["arr_0"], batch_size=4)
  fid = frechet_by_eigh(FeatureStats.of(feats["pool3"]), FeatureStats.of(ref_feats["pool3"]))
  logged = eval_rows(tmp / "full")[4]
  err = abs(logged["FID-6"] - fid) / fid
  assert err < 1e-4, f"in-loop FID {logged['FID-6']} vs {fid} outside the loop: relative error {err:.2e}"
  assert logged["IS-6"] == pytest.approx(inception_score(feats["logits"]), rel=1e-4)


def test_names_and_config_errors(tmp):
  assert [count_name(n) for n in (50_000, 10_000, 6, 2500)] == ["50K", "10K", "6", "2500"]
  config = tiny_config("flow", steps=4)
  config.eval_every_steps = 2
  with pytest.raises(ValueError, match="eval_every_steps needs eval.reference"):
    validate(config)
  config.eval.reference = str(tmp / "ref.npz")
  with pytest.raises(ValueError, match="eval.sample.method 'ddpm' cannot sample a 'flow' model"):
    validate(config)
  config.eval.sample.method = "euler"
  validate(config)
  with pytest.raises(FileNotFoundError, match="Inception checkpoint .* not found"):
    config.eval.inception = str(tmp / "nope")
    train(config, tmp / "run", loader=ToyLoader(8))


def test_latent_models_are_decoded_by_eval_vae(runs, tmp):
  """4-channel latents: refused without eval.vae (or with a VAE of other latent channels), scored through it."""
  from flax import nnx

  from dit_jax import parallel
  from dit_jax.eval.loop import TrainingEvaluator
  from dit_jax.models.vae import AutoencoderKL, VAEConfig
  from dit_jax.trainer import build_model

  base, _ = runs
  rng = np.random.default_rng(0)
  for channels in (4, 16):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: AutoencoderKL(
        VAEConfig(latent_channels=channels, block_out_channels=(32, 32), layers_per_block=1), rngs=nnx.Rngs(0))))
    state = jax.tree.map(lambda a: 0.2 * rng.standard_normal(a.shape).astype(np.float32), state)
    dit_jax.save(nnx.merge(graphdef, state), tmp / f"vae{channels}")
  config = tiny_config("flow")
  config.model.in_channels = 4
  config.eval_every_steps = 2
  config.eval.update(num_samples=4, batch_size=4, reference=str(base / "ref.npz"), inception=str(base / "inception"))
  config.eval.sample.update(method="euler", steps=2)
  mesh = parallel.make_mesh((-1, 1, 1))
  with pytest.raises(ValueError, match="4-channel latents: set eval.vae"):
    TrainingEvaluator(config, mesh)
  config.eval.vae = str(tmp / "vae16")
  with pytest.raises(ValueError, match="has 16 latent channels, the model 4"):
    TrainingEvaluator(config, mesh)
  config.eval.vae = str(tmp / "vae4")
  scores = TrainingEvaluator(config, mesh)(build_model(config, nnx.Rngs(0)))
  assert set(scores) == {"FID-4", "IS-4"} and all(np.isfinite(v) for v in scores.values()), scores
