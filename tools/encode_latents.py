"""Encode an image dataset once into VAE posterior shards for data.source "latents" (dit_jax/data/latents.py).

  python tools/encode_latents.py --vae /ckpt/sd-vae-ft-ema --out /data/in256-latents --image-size 256 \
      --data.source tfds --data.name imagenet2012 --data.manual_dir /data/imagenet [--dtype float16]
  python train.py --config configs/dit_xl2_256.py --workdir runs/dit-xl2 --config.data.folder /data/in256-latents

Images are read in index order (no shuffle), ADM-centre-cropped to --image-size, and encoded together with their
horizontal flip in one jitted batch (split over all local devices along the batch). Per image it stores the
posterior mean and std of both views, (2, h, w, C) each, so training can draw a fresh flip and a fresh posterior
sample every time instead of freezing one of each (fast-DiT). Shards are written atomically and listed in
manifest.json as they finish: re-running the same command resumes, skipping finished shards.

--vae is a VAE checkpoint directory (dit_jax.load_vae), or ``random:PRESET`` (e.g. random:sd-vae-ft-ema, with
--vae-overrides JSON and --seed): random weights, for tests and throughput benchmarks only.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import functools
import json
import logging
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from dit_jax import data
from dit_jax.cli import ArgumentParser, fail
from dit_jax.data.latents import FORMAT, MANIFEST, shard_name, write_atomic, write_manifest
from dit_jax.data.sources import CorruptImage
from dit_jax.data.transforms import center_crop_arr, to_channels
from dit_jax.models.vae import AutoencoderKL, vae_config

logger = logging.getLogger("dit_jax")
RESUME_KEYS = ("num_examples", "shard_size", "latent_shape", "dtype", "vae", "vae_spec", "image_size", "source")


def build_vae(spec: str, overrides: dict | None = None, seed: int = 0) -> AutoencoderKL:
  """``random:PRESET`` -> random-weight AutoencoderKL (tests / benchmarks); else a checkpoint via load_vae."""
  if spec.startswith("random:"):
    return AutoencoderKL(vae_config(spec[len("random:"):], **(overrides or {})), rngs=nnx.Rngs(seed))
  if overrides:
    raise SystemExit("--vae-overrides only applies to --vae random:PRESET")
  import dit_jax

  load_vae = getattr(dit_jax, "load_vae", None)
  if load_vae is None:
    raise SystemExit("this dit_jax has no load_vae(path); use --vae random:PRESET or update dit_jax")
  return load_vae(spec)


def crop_uint8(image: np.ndarray, size: int, channels: int) -> np.ndarray:
  """uint8 (H, W, C) -> uint8 (S, S, channels): the crop of ``transforms.preprocess`` before v / 127.5 - 1."""
  image = to_channels(np.asarray(image, np.uint8), channels)
  if image.shape[:2] != (size, size):
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    image = np.asarray(center_crop_arr(pil, size)).reshape(size, size, image.shape[-1])
  return image


def make_encoder(vae: AutoencoderKL, dtype, devices=None):
  """uint8 (B, S, S, C) crops -> (mean, std), each dtype (B, 2, h, w, Z): view 0 the crop, view 1 its flip.
  B must be a multiple of the device count; with several devices the batch is split over a 1-D mesh."""
  devices = list(devices or jax.local_devices())
  graphdef, params = nnx.split(vae)
  if len(devices) > 1:
    mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  else:
    batch_sharding = devices[0]
    params = jax.device_put(params, devices[0])

  @jax.jit
  def encode(params, crops):
    x = crops.astype(jnp.float32) / jnp.float32(127.5) - jnp.float32(1.0)
    x = jnp.stack([x, x[:, :, ::-1]], axis=1).reshape(-1, *x.shape[1:])  # (2B, S, S, C): image, flip, ...
    post = nnx.merge(graphdef, params).encode(x)
    views = lambda a: a.reshape(crops.shape[0], 2, *a.shape[1:]).astype(dtype)
    return views(post.mean), views(post.std)

  return lambda crops: encode(params, jax.device_put(crops, batch_sharding)), len(devices)


def encode_dataset(source, vae: AutoencoderKL, out: str | os.PathLike, *, image_size: int, batch_size: int = 64,
                   shard_size: int = 1024, dtype: str = "float16", vae_spec: str = "", source_info: dict | None = None,
                   num_workers: int = 8, devices=None) -> dict:
  """Encode ``source`` (index order) into ``out``; resumes a compatible unfinished directory. Returns the manifest."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  cfg, n = vae.config, len(source)
  f = cfg.downsample_factor
  if image_size % f:
    raise SystemExit(f"--image-size {image_size} is not a multiple of the VAE's downsample factor {f}")
  num_shards = -(-n // shard_size)
  manifest = {"format": FORMAT, "num_examples": n, "shard_size": shard_size, "num_shards": num_shards,
              "latent_shape": [image_size // f, image_size // f, cfg.latent_channels], "dtype": dtype,
              "vae": cfg.to_dict(), "vae_spec": vae_spec, "image_size": image_size,
              "num_classes": data.num_classes_of(source), "source": source_info or {"type": type(source).__name__},
              "views": ["image", "horizontal flip"], "shards_done": [], "complete": False}
  old_path = out / MANIFEST
  if old_path.exists():
    old = json.loads(old_path.read_text())
    diff = [k for k in RESUME_KEYS if old.get(k) != json.loads(json.dumps(manifest[k]))]
    if diff:
      raise SystemExit(f"{out} holds latents of another run (differs in {', '.join(diff)}); use a new --out")
    manifest["shards_done"] = sorted(k for k in old.get("shards_done", ()) if (out / shard_name(k)).exists())
  for stray in out.glob(".shard_*.tmp-*"):
    stray.unlink()
  done = set(manifest["shards_done"])
  write_manifest(out, manifest)
  todo = [k for k in range(num_shards) if k not in done]
  logger.info("%d images -> %d shards in %s (%d done)", n, num_shards, out, len(done))

  encode, n_dev = make_encoder(vae, jnp.dtype(dtype), devices)
  step = -(-batch_size // n_dev) * n_dev
  c = cfg.in_channels

  def read(i: int):
    try:
      item = source[i]
      return crop_uint8(item["image"], image_size, c), int(item["label"])
    except CorruptImage as e:
      logger.warning("item %d is corrupt, stored with label -1: %s", i, e)
      return np.zeros((image_size, image_size, c), np.uint8), -1

  indices = [i for k in todo for i in range(k * shard_size, min(n, (k + 1) * shard_size))]
  pool = concurrent.futures.ThreadPoolExecutor(max(num_workers, 1))
  ahead = collections.deque()
  feed = iter(indices)

  def next_items(count: int):
    while len(ahead) < count + 4 * step:
      i = next(feed, None)
      if i is None:
        break
      ahead.append(pool.submit(read, i))
    return [ahead.popleft().result() for _ in range(min(count, len(ahead)))]

  start = time.perf_counter()
  try:
    for k in todo:
      lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
      means, stds, labels, pending = [], [], [], None
      for b in range(lo, hi, step):
        items = next_items(min(step, hi - b))
        crops = np.zeros((step, image_size, image_size, c), np.uint8)
        crops[:len(items)] = np.stack([x for x, _ in items])
        labels += [y for _, y in items]
        result = (encode(crops), len(items))  # dispatched; fetched after the next batch is dispatched
        if pending is not None:
          means.append(np.asarray(pending[0][0])[:pending[1]])
          stds.append(np.asarray(pending[0][1])[:pending[1]])
        pending = result
      means.append(np.asarray(pending[0][0])[:pending[1]])
      stds.append(np.asarray(pending[0][1])[:pending[1]])
      label = np.asarray(labels, np.int64)
      mean, std = np.concatenate(means), np.concatenate(stds)
      mean[label < 0] = 0
      std[label < 0] = 0
      arrays = {"mean": mean, "std": std, "label": label, "index": np.arange(lo, hi, dtype=np.int64)}
      write_atomic(out / shard_name(k), functools.partial(np.savez, **arrays))
      done.add(k)
      manifest["shards_done"] = sorted(done)
      manifest["complete"] = len(done) == num_shards
      write_manifest(out, manifest)
      logger.info("shard %d done (%d/%d, %.1f images/s)", k, len(done), num_shards,
                  (hi - todo[0] * shard_size) / (time.perf_counter() - start))
  finally:
    pool.shutdown(wait=False, cancel_futures=True)
  manifest["complete"] = len(done) == num_shards
  write_manifest(out, manifest)
  return manifest


def parse_args(argv=None) -> argparse.Namespace:
  p = ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--vae", required=True, help="VAE checkpoint directory, or random:PRESET (tests / benchmarks)")
  p.add_argument("--vae-overrides", default="", help="JSON VAEConfig overrides for random:PRESET")
  p.add_argument("--seed", type=int, default=0, help="weight seed for random:PRESET")
  p.add_argument("--out", required=True, help="output directory (resumed if it holds an unfinished run)")
  p.add_argument("--image-size", type=int, default=256)
  p.add_argument("--batch-size", type=int, default=64, help="images per encode call (each also encoded flipped)")
  p.add_argument("--shard-size", type=int, default=1024, help="images per shard")
  p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage dtype of mean / std")
  p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="image decoding threads")
  for key, value in data.default_data_config().items():
    kind = (lambda s: s.lower() in ("1", "true", "yes")) if isinstance(value, bool) else type(value)
    p.add_argument(f"--data.{key}", dest=f"data_{key}", type=kind, default=value, help=f"data config {key}")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s: %(message)s")
  args = parse_args(argv)
  data_config = data.default_data_config()
  for key in data_config:
    data_config[key] = getattr(args, f"data_{key}")
  if data_config.source == "latents":
    raise SystemExit("--data.source latents is already encoded")
  source = data.make_source(data_config)
  vae = build_vae(args.vae, json.loads(args.vae_overrides) if args.vae_overrides else None, args.seed)
  info = {k: data_config[k] for k in ("source", "name", "split", "folder") if data_config[k]}
  return encode_dataset(source, vae, args.out, image_size=args.image_size, batch_size=args.batch_size,
                        shard_size=args.shard_size, dtype=args.dtype, vae_spec=args.vae, source_info=info,
                        num_workers=args.workers)


def cli(argv=None) -> int:
  """The command line: main(), with user errors reported as one line ``error: ...`` and exit status 2."""
  from dit_jax.checkpoint import CheckpointError

  try:
    main(argv)
  except SystemExit as e:  # argparse (already reported in one line) or a message of main's
    return fail(e.code) if isinstance(e.code, str) else int(e.code or 0)
  except (ValueError, FileNotFoundError, NotADirectoryError, CheckpointError) as e:  # incl. bad --vae-overrides JSON
    return fail(e)
  return 0


if __name__ == "__main__":
  sys.exit(cli())
