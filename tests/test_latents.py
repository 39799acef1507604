"""Latent shards: tools/encode_latents.py parity and resume, LatentSource sampling, and training on latents."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from dit_jax import data
from dit_jax.data.latents import LatentSource, shard_name
from dit_jax.models.vae import AutoencoderKL, vae_config
from tests.helpers import REPO_ROOT
from tests.helpers.processes import one_line_error
from tests.helpers.training import losses, tiny_config

SIZE, OVERRIDES = 16, {"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
                       "latent_channels": 4, "shift_factor": 0.1}

spec = importlib.util.spec_from_file_location("encode_latents", REPO_ROOT / "tools" / "encode_latents.py")
encode_latents = importlib.util.module_from_spec(spec)
spec.loader.exec_module(encode_latents)


def vae():
  return AutoencoderKL(vae_config("sd-vae-ft-ema", **OVERRIDES), rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
  """(image folder, latent dir, manifest): 24 random RGB PNGs (some not square) in 3 classes, 10 per shard."""
  root = tmp_path_factory.mktemp("latents")
  rng = np.random.default_rng(0)
  for i in range(24):
    folder = root / "images" / f"class{i % 3}"
    folder.mkdir(parents=True, exist_ok=True)
    shape = (SIZE, SIZE + 4 * (i % 2), 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{i:03d}.png")
  out = root / "lat"
  manifest = encode_latents.main(["--vae", "random:sd-vae-ft-ema", "--vae-overrides", json.dumps(OVERRIDES),
                                  "--seed", "3", "--out", str(out), "--data.source", "folder",
                                  "--data.folder", str(root / "images"), "--image-size", str(SIZE),
                                  "--batch-size", "4", "--shard-size", "10", "--dtype", "float32"])
  return root / "images", out, manifest


def test_manifest_and_stored_posteriors_match_the_vae(encoded):
  images, out, manifest = encoded
  assert manifest["complete"] and manifest["shards_done"] == [0, 1, 2] and manifest["num_examples"] == 24
  assert manifest["latent_shape"] == [8, 8, 4] and manifest["num_classes"] == 3
  assert manifest["vae"]["scaling_factor"] == 0.18215 and manifest["vae"]["shift_factor"] == 0.1
  source, folder = LatentSource(out), data.FolderSource(images)
  model = vae()
  for i in range(24):
    item, img = source[i], folder[i]
    views = np.stack([data.preprocess(img["image"], SIZE, flip) for flip in (False, True)])
    post = model.encode(views)
    np.testing.assert_allclose(item["mean"], post.mean, atol=1e-5, rtol=0)
    np.testing.assert_allclose(item["std"], post.std, atol=1e-5, rtol=0)
    assert item["label"] == img["label"]
  assert not np.allclose(source[0]["mean"][0], source[0]["mean"][1])


def test_resume_after_an_interruption_rewrites_identical_shards(encoded, tmp_path):
  images, out, _ = encoded
  copy = tmp_path / "lat"
  copy.mkdir()
  for p in out.iterdir():
    (copy / p.name).write_bytes(p.read_bytes())
  manifest = json.loads((copy / "manifest.json").read_text())
  manifest.update(shards_done=[0, 1], complete=False)  # shard 2 lost mid-run: file gone, a stray temp left behind
  (copy / "manifest.json").write_text(json.dumps(manifest))
  (copy / shard_name(2)).unlink()
  (copy / f".{shard_name(2)}.tmp-999").write_bytes(b"half a shard")
  with pytest.raises(ValueError, match="unfinished"):
    LatentSource(copy)
  encode_latents.main(["--vae", "random:sd-vae-ft-ema", "--vae-overrides", json.dumps(OVERRIDES), "--seed", "3",
                       "--out", str(copy), "--data.source", "folder", "--data.folder", str(images), "--image-size",
                       str(SIZE), "--batch-size", "4", "--shard-size", "10", "--dtype", "float32"])
  assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in out.iterdir())
  for k in range(3):
    assert (copy / shard_name(k)).read_bytes() == (out / shard_name(k)).read_bytes()
  with pytest.raises(SystemExit, match="another run"):
    encode_latents.main(["--vae", "random:sd-vae-ft-ema", "--vae-overrides", json.dumps(OVERRIDES), "--out",
                         str(copy), "--data.source", "folder", "--data.folder", str(images), "--image-size", "8"])
  assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in out.iterdir())  # nothing touched
  assert (copy / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()


@pytest.mark.parametrize("args,fragment", [
    (["--image-size", "8"], "holds latents of another run (differs in latent_shape, image_size)"),
    (["--image-size", "9"], "--image-size 9 is not a multiple of the VAE's downsample factor 2"),
    (["--vae-overrides", "{bad"], "Expecting property name"),
    (["--dtype", "bf16"], "argument --dtype: invalid choice: 'bf16'"),
    (["--data.folder", "{tmp}/absent"], "absent"),
])
def test_cli_errors_are_one_line_and_keep_the_output(encoded, tmp_path, capsys, args, fragment):
  images, out, _ = encoded
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  argv = {"--vae": "random:sd-vae-ft-ema", "--vae-overrides": json.dumps(OVERRIDES), "--seed": "3", "--out": str(out),
          "--data.source": "folder", "--data.folder": str(images), "--image-size": str(SIZE), "--shard-size": "10",
          "--dtype": "float32"}
  argv.update(zip(args[::2], (a.replace("{tmp}", str(tmp_path)) for a in args[1::2])))
  one_line_error(encode_latents.cli([x for kv in argv.items() for x in kv]), capsys.readouterr().err, fragment)
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_missing_manifest_is_a_one_line_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no manifest.json"):
    LatentSource(tmp_path)


def test_loader_draws_fresh_flips_and_posterior_samples(encoded):
  _, out, _ = encoded
  source = LatentSource(out)
  scale, shift = source.scaling_factor, source.shift_factor
  loader = data.Loader(source, global_batch_size=8, seed=0, image_size=0, shuffle=False, num_workers=2)
  assert loader.channels == 4
  draws = collections_of(loader, epochs=300)  # index -> [(epoch, z)]
  i, views = 5, np.stack([source[5]["mean"], source[5]["std"]])  # (2 [mean, std], 2 views, h, w, C)
  (_, z0), (_, z1) = draws[i][:2]
  assert not np.allclose(z0, z1)
  for e, z in draws[i][:2]:
    m, s = views[:, int(loader.flip(e, i))]
    assert np.all(np.abs(z / scale + shift - m) <= 6 * s)
  flips = np.mean([loader.flip(e, j) for j in draws for e, _ in draws[j]])
  assert 0.45 < flips < 0.55
  raw = np.stack([z for e, z in draws[i] if not loader.flip(e, i)]) / scale + shift
  np.testing.assert_allclose(raw.mean(0), views[0, 0], atol=4 * views[1, 0].max() / np.sqrt(len(raw)))
  np.testing.assert_allclose(raw.std(0), views[1, 0], rtol=0.35)
  unflipped = data.Loader(source, global_batch_size=8, seed=0, image_size=0, shuffle=False, random_flip=False,
                          num_workers=0)
  z = next(unflipped)["image"][5] / scale + shift
  assert np.all(np.abs(z - views[0, 0]) <= 6 * views[1, 0])
  loader.close()


def collections_of(loader, epochs):
  out = {}
  for _ in range(epochs * loader.steps_per_epoch):
    epoch, position = loader.epoch, loader.position
    batch = next(loader)
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (8, 8, 8, 4)
    assert batch["label"].dtype == np.int32
    for row, z in enumerate(batch["image"]):
      out.setdefault(position + row, []).append((epoch, z))
  return out


def latent_config(out, steps):
  c = tiny_config("flow", steps=steps)
  c.model.update(input_size=8, in_channels=4, num_classes=3)
  c.data.update(source="latents", folder=str(out), random_flip=True)
  c.log_every_steps, c.checkpoint_every_steps = 1, 2
  return c


def test_training_on_latents_resumes_exactly(encoded, tmp_path):
  from dit_jax.train import train

  _, out, _ = encoded
  train(latent_config(out, 4), tmp_path / "full")
  train(latent_config(out, 2), tmp_path / "split")
  train(latent_config(out, 4), tmp_path / "split")
  full, split = losses(tmp_path / "full"), losses(tmp_path / "split")
  assert sorted(full) == [1, 2, 3, 4] and all(np.isfinite(list(full.values())))
  assert split == full
