"""The model-kind registry: a new kind is one registry entry plus its files. A toy kind, defined only here,
trains, checkpoints, loads and samples through the public entry points."""
from __future__ import annotations

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dit_jax
from dit_jax import checkpoint, kinds
from dit_jax.kinds.dit import check_labels
from dit_jax.models.config import JsonConfig
from dit_jax.train import train
from dit_jax.train_config import default_config, validate
from tests.helpers import REPO_ROOT
from tests.helpers.training import losses


@dataclasses.dataclass(frozen=True)
class ToyConfig(JsonConfig):
  input_size: int = 8
  in_channels: int = 1
  num_classes: int = 10
  hidden: int = 16


class ToyNet(nnx.Module):
  """Per-pixel MLP with time and label embeddings: x (B, H, W, C), t (B,), y (B,) -> (B, H, W, C)."""

  def __init__(self, config: ToyConfig, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32, attention_impl="auto",
               remat="none", scan_layers=False):
    self.config = c = config
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.x_in = nnx.Linear(c.in_channels, c.hidden, **kw)
    self.t_in = nnx.Linear(1, c.hidden, **kw)
    self.y_in = nnx.Embed(c.num_classes + 1, c.hidden, **kw)
    self.out = nnx.Linear(c.hidden, c.in_channels, **kw)

  def __call__(self, x, t, y):
    h = self.x_in(x) + (self.t_in(t[:, None].astype(x.dtype)) + self.y_in(y))[:, None, None]
    return self.out(nnx.silu(h))


class ToyKind(kinds.Kind):
  name = "toy"
  module = ToyNet
  config = ToyConfig
  conditioning = "labels"
  batch_ndims = {"image": 4, "label": 1}
  train_section = "toy"

  def train_defaults(self):
    import ml_collections
    return ml_collections.ConfigDict(dataclasses.asdict(ToyConfig()))

  def model_config(self, config):
    return ToyConfig(**config.toy)

  def network(self, config, model, batch, dropout_key):
    return lambda x, t: model(x, t, batch["label"])

  def flops(self, cfg, batch):
    return 2.0 * 4 * cfg.hidden * cfg.input_size**2

  def grid_cond(self, config, model, num):
    return np.arange(num) % model.config.num_classes

  def prepare_sample(self, cfg, cond, *, method, shift, flow_convention, negative=None, skip_layer_guidance=None,
                     latent_size=None):
    labels = np.asarray(cond)
    check_labels(labels, cfg.num_classes)
    labels = labels.astype(np.int32)
    return kinds.SampleSpec(cond=labels, uncond=np.full_like(labels, cfg.num_classes),
                            latent_shape=(len(labels), cfg.input_size, cfg.input_size, cfg.in_channels),
                            method=method or "euler", shift=1.0 if shift is None else shift,
                            flow_convention=flow_convention or "sit")

  def sample_network(self, model, skip_layers=()):
    return lambda x, t, y: model(x, t, y)


@pytest.fixture(scope="module")
def toy_kind():
  kind = kinds.register(ToyKind())
  yield kind
  del kinds.KINDS["toy"]


@pytest.fixture(scope="module")
def toy_run(toy_kind, tmp_path_factory):
  """Four steps of rectified flow on the embedded digits, with a sample grid and a checkpoint."""
  c = default_config()
  c.model.kind = "toy"
  c.objective = "flow"
  c.toy.hidden = 24
  c.data.update(source="digits", image_size=8)
  c.update(total_steps=4, global_batch_size=8, log_every_steps=1, checkpoint_every_steps=2, sample_every_steps=4,
           keep_period=0, ema_decay=0.5)
  c.sample.update(method="euler", steps=3, num=4)
  workdir = tmp_path_factory.mktemp("toy")
  train(c, workdir)
  return c, workdir


def test_toy_kind_trains_checkpoints_and_loads(toy_run):
  config, workdir = toy_run
  assert sorted(losses(workdir)) == [1, 2, 3, 4]
  assert (workdir / "samples" / "0000004.png").is_file()
  model = dit_jax.load(workdir)
  assert isinstance(model, ToyNet) and model.config.hidden == 24
  assert checkpoint.read_meta(workdir)["kind"] == "toy"
  saved = dit_jax.save(model, workdir.parent / "toy_saved")
  again = dit_jax.load(saved)
  a, b = checkpoint.flat_params(model), checkpoint.flat_params(again)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_toy_kind_samples_through_sample_and_the_cli(toy_run, tmp_path):
  _, workdir = toy_run
  model = dit_jax.load(workdir)
  latents = dit_jax.sample(model, np.array([1, 2, 3]), jax.random.key(0), method="euler", steps=3, cfg_scale=2.0)
  assert latents.shape == (3, 8, 8, 1) and np.isfinite(np.asarray(latents)).all()
  spec = importlib.util.spec_from_file_location("sample_cli", REPO_ROOT / "sample.py")
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  out = tmp_path / "grid.png"
  assert cli.main(["--checkpoint", str(workdir), "--class-labels", "0,1,2,3", "--method", "euler", "--steps", "3",
                   "--out", str(out)]) == 0
  assert out.is_file()


def test_registry_errors_name_the_known_kinds(toy_kind):
  with pytest.raises(ValueError,
                     match="unknown model kind 'nope'; choose one of dit, mmdit, vae, clip_text, t5_encoder, flux, inception, toy"):
    kinds.get("nope")
  c = default_config()
  c.model.kind = "vae"
  with pytest.raises(ValueError, match="model.kind 'vae' is not one of 'dit', 'mmdit', 'flux', 'toy'"):
    validate(c)
  with pytest.raises(ValueError, match="model kind 'vae' cannot be sampled"):
    kinds.get("vae").prepare_sample(None, None, method=None, shift=None, flow_convention=None)


def test_no_kind_branches_outside_the_registry():
  """Code outside dit_jax/kinds asks the registry; it does not test a model's kind itself."""
  import re
  pattern = re.compile(r"kind ==|kind !=|isinstance\(.*(MMDiT|DiT|AutoencoderKL)")
  hits = [f"{p.relative_to(REPO_ROOT)}:{i}" for p in (REPO_ROOT / "dit_jax").rglob("*.py")
          if "kinds" not in p.parts for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
  assert not hits, hits
