"""Synthetic training data for distillation (LADD trains on teacher samples): ``distill.teacher_data.num_samples``
latents sampled once by the frozen teacher, written as a latent directory (:mod:`dit_jax.data.latents`) that
training then reads in place of ``config.data``.

Before the first step ``train`` calls :func:`training_data`, which generates (or finishes, or reuses) the directory
``distill.teacher_data.dir`` (default ``<workdir>/teacher_samples``) and returns the data config that reads it:

  sample i        conditioned as the training loop's grid (``Kind.grid_cond``): label i mod K, class-balanced (DiT
                  labels, MMDiT class tokens), or text row i (``data.conditioning 'text'``: N must be the rows)
  x_T of i        normal(fold_in(fold_in(key(seed), NOISE_STREAM), i)) (h, w, C): a function of (seed, i) only
  sampler         ``dit_jax.sample`` on the training mesh (``distill.teacher_data.sample``: method, steps, cfg_scale,
                  cfg_mode, shift; shift 0 = the kind's grid shift, ``flow.shift``), B = ``batch_size`` (0: the
                  global batch) per call; batch b of shard k (b = k ceil(S / B) + j) draws a stochastic sampler's
                  step noise from fold_in(fold_in(key(seed), STEP_STREAM), b)
  shard k         samples [k S, (k + 1) S) in batches that never straddle a shard; ``mean`` (n, 2, h, w, C) float32
                  (the sample and its horizontal flip), no ``std`` (items are the samples themselves), ``label``
                  int64 (n,) (0 for text rows), ``index``
  manifest.json   the latent manifest (``vae``: scale 1, shift 0: samples are in the model's units) plus ``teacher``
                  (path, kind, config, fingerprint of its parameters) and ``generation`` (seed, sampler, B, dtype,
                  conditioning)

Written once, resumable: process 0 writes each shard and then the manifest atomically (every process samples,
the mesh is shared); a generation killed part-way continues from its finished shards and writes the same bytes as
an uninterrupted one (npz entries carry a fixed timestamp); a complete directory is reused as is; one written by
another teacher or with other settings is refused with a one-line error and left untouched. The directory must
be on a file system every host sees (as the workdir). Training then reads it without flips unless
``distill.teacher_data.random_flip``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pathlib
import time
import zipfile
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from dit_jax import data, kinds
from dit_jax.data.latents import FORMAT, MANIFEST, shard_name, write_atomic, write_manifest
from dit_jax.diffusion.samplers import sample

logger = logging.getLogger("dit_jax")

NOISE_STREAM = 0xFFFFFFFF  # fold_in tags of the seed's key (training steps fold in 0, 1, 2, ...)
STEP_STREAM = 0xFFFFFFFE
DTYPE = "float32"
IDENTITY = ("num_examples", "shard_size", "latent_shape", "dtype", "num_classes", "teacher", "generation")


def directory(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> pathlib.Path:
  """``distill.teacher_data.dir``, or ``<workdir>/teacher_samples``."""
  return pathlib.Path(config.distill.teacher_data.dir or pathlib.Path(workdir) / "teacher_samples")


def initial_noise(seed: int, indices, shape: tuple[int, ...]) -> jax.Array:
  """x_T (len(indices), *shape) of the samples ``indices``: row i from fold_in(noise stream of seed, i)."""
  stream = jax.random.fold_in(jax.random.key(seed), NOISE_STREAM)
  return _noise(stream, jnp.asarray(np.asarray(indices), jnp.uint32), tuple(shape))


@functools.partial(jax.jit, static_argnums=2)
def _noise(stream, indices, shape):
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(stream, i), shape, jnp.float32))(indices)


def batch_key(seed: int, b: int) -> jax.Array:
  """The key of sampler call b (a stochastic sampler's step noise)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), STEP_STREAM), b)


def _hash_leaf(x: jax.Array) -> jax.Array:
  """(2,) uint32: sum of the bit patterns and their sum weighted by 2 * flat index + 1, both mod 2^32 (integer
  sums are exact in any order, so any mesh gives the same value; one changed element changes the second)."""
  bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
  bits = bits.astype(jnp.uint32)
  index, stride = jnp.zeros(x.shape, jnp.uint32), 1
  for d in reversed(range(x.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride % 2**32)
    stride *= x.shape[d]
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)])


def fingerprint(state: nnx.State, mesh: jax.sharding.Mesh) -> str:
  """sha256 over every numeric array of ``state`` (path, shape, dtype and :func:`_hash_leaf`), computed on the
  mesh where the arrays live (no gather)."""
  named = [(".".join(map(str, p)), v[...]) for p, v in nnx.to_flat_state(state)]
  named = [(p, a) for p, a in named if jnp.issubdtype(a.dtype, jnp.number) and a.dtype.itemsize <= 4]
  hashes = jax.jit(lambda xs: [_hash_leaf(x) for x in xs],
                   out_shardings=NamedSharding(mesh, PartitionSpec()))([a for _, a in named])
  h = hashlib.sha256()
  for (path, a), v in zip(named, hashes):
    h.update(f"{path} {a.shape} {a.dtype} {np.asarray(v.addressable_data(0)).tolist()}\n".encode())
  return h.hexdigest()


def _conditioning(config: ml_collections.ConfigDict, kind, teacher) -> tuple[dict, int]:
  """(what the samples are conditioned on, recorded; K classes of the labels stored)."""
  d = config.data
  if d.conditioning == "label":
    return {"kind": "label", "num_classes": int(teacher.config.num_classes)}, int(teacher.config.num_classes)
  if d.conditioning == "class_tokens":
    spec = kind.conditioning_meta(config)
    return spec, int(spec["num_classes"])
  rows = len(data.TextEmbeddings(d.text_folder))
  if rows != config.distill.teacher_data.num_samples:
    raise ValueError(f"distill.teacher_data.num_samples {config.distill.teacher_data.num_samples} must equal the "
                     f"{rows} rows of data.text_folder {d.text_folder} (sample i is conditioned on text row i)")
  return {"kind": "text", "text_folder": str(pathlib.Path(d.text_folder).absolute()), "rows": rows}, 1


def describe(config: ml_collections.ConfigDict, teacher, mesh: jax.sharding.Mesh) -> dict:
  """The manifest of the directory ``config`` asks for (without ``shards_done`` / ``complete``), JSON-normal."""
  t, s = config.distill.teacher_data, config.distill.teacher_data.sample
  kind = kinds.get(config.model.kind)
  conditioning, num_classes = _conditioning(config, kind, teacher)
  batch = t.batch_size or config.global_batch_size
  shift = float(s.shift) if s.shift > 0 else kind.grid_sample_kwargs(config).get("shift")
  manifest = {
      "format": FORMAT, "num_examples": int(t.num_samples), "shard_size": int(t.shard_size),
      "num_shards": -(-int(t.num_samples) // int(t.shard_size)),
      "latent_shape": list(kind.example_batch(config, 1)["image"].shape[1:]), "dtype": DTYPE,
      "vae": {"scaling_factor": 1.0, "shift_factor": 0.0}, "num_classes": num_classes,
      "source": {"type": "teacher_samples"}, "views": ["sample", "horizontal flip"],
      "teacher": {"path": str(pathlib.Path(config.teacher.checkpoint).absolute()), "kind": kind.name,
                  "config": teacher.config.to_dict(), "fingerprint": fingerprint(teacher.state, mesh)},
      "generation": {"seed": int(config.seed), "method": s.method, "steps": int(s.steps),
                     "cfg_scale": float(s.cfg_scale), "cfg_mode": s.cfg_mode, "shift": shift,
                     "flow_convention": config.flow.convention, "compute_dtype": config.compute_dtype,
                     "batch_size": int(batch), "conditioning": conditioning}}
  return json.loads(json.dumps(manifest))


def _differences(old, new, prefix: str = "") -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    return [d for k in dict.fromkeys([*new, *old]) if k != "path" or prefix != "teacher."
            for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
  if old == new:
    return []
  short = lambda v: v if len(json.dumps(v)) <= 24 else json.dumps(v)[:21] + "..."
  return [f"{prefix[:-1]} {short(old)} there, {short(new)} here"]


def finished_shards(out: pathlib.Path, want: dict) -> list[int]:
  """The shards of ``out`` already written for the manifest ``want``; one-line errors for a directory of another
  teacher or other settings, or one that is not a teacher-sample directory (nothing is changed)."""
  path = out / MANIFEST
  if not path.exists():
    if any(out.glob("shard_*.npz")):
      raise ValueError(f"{out} holds shards but no {MANIFEST}: not a teacher-sample directory; set "
                       "distill.teacher_data.dir to a new one")
    return []
  old = json.loads(path.read_text())
  if old.get("format") != FORMAT or "generation" not in old:
    raise ValueError(f"{out} is not a teacher-sample directory (its {MANIFEST} has no generation settings); set "
                     "distill.teacher_data.dir to a new one")
  diff = [d for k in IDENTITY for d in _differences({k: old.get(k)}, {k: want[k]})]
  if diff:
    raise ValueError(f"{out} holds samples of another teacher or other settings ({'; '.join(diff[:3])}"
                     f"{'; ...' if len(diff) > 3 else ''}): set distill.teacher_data.dir to a new directory")
  return sorted(k for k in old.get("shards_done", ()) if (out / shard_name(k)).exists())


def _savez(f, **arrays) -> None:
  """``np.savez`` (uncompressed, readable by ``npz_memmap``) with a fixed entry timestamp: same arrays, same bytes."""
  with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
    for name, a in arrays.items():
      with zf.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w", force_zip64=True) as fid:
        np.lib.format.write_array(fid, np.ascontiguousarray(a))


def _agree_on_done(out: pathlib.Path, want: dict) -> set[int]:
  """Process 0's finished shards, broadcast (every process samples the same shards); its error on every process."""
  status, error = np.zeros(want["num_shards"] + 1, np.int32), None
  if jax.process_index() == 0:
    try:
      status[1 + np.asarray(finished_shards(out, want), np.int64)] = 1
      status[0] = 1
    except ValueError as e:
      error = e
  status = np.asarray(multihost_utils.broadcast_one_to_all(status))
  if error is not None:
    raise error
  if not status[0]:
    raise ValueError(f"process 0 refused the teacher-sample directory {out} (see its error)")
  return {int(k) for k in np.flatnonzero(status[1:])}


def generate(config: ml_collections.ConfigDict, teacher, mesh: jax.sharding.Mesh, out: str | os.PathLike, *,
             on_shard: Callable[[int], None] | None = None) -> dict:
  """Sample the teacher (:class:`dit_jax.distill.teacher.Teacher`) into ``out`` as the module docstring says,
  continuing an unfinished directory; returns the manifest. ``on_shard(k)`` runs after shard k is written."""
  out = pathlib.Path(out)
  want = describe(config, teacher, mesh)
  g, n, size = want["generation"], want["num_examples"], want["shard_size"]
  batch, num_shards = g["batch_size"], want["num_shards"]
  if batch % mesh.size:
    raise ValueError(f"distill.teacher_data.batch_size {batch} must be divisible by the mesh's {mesh.size} devices")
  is_main = jax.process_index() == 0
  if is_main:
    out.mkdir(parents=True, exist_ok=True)
  done = _agree_on_done(out, want)
  manifest = {**want, "shards_done": sorted(done), "complete": len(done) == num_shards}
  if manifest["complete"]:
    logger.info("teacher samples: reusing the %d in %s", n, out)
    return manifest
  if is_main:
    for stray in out.glob(".*.tmp-*"):
      stray.unlink()
    write_manifest(out, manifest)
  kind, model = kinds.get(config.model.kind), teacher.model()
  shape, per_shard = tuple(want["latent_shape"]), -(-size // batch)
  options = dict(method=g["method"], steps=g["steps"], cfg_scale=g["cfg_scale"], cfg_mode=g["cfg_mode"],
                 flow_convention=g["flow_convention"], mesh=mesh,
                 **({"shift": g["shift"]} if g["shift"] is not None else {}))
  todo = [k for k in range(num_shards) if k not in done]
  logger.info("teacher samples: %d in %d shards of %d into %s (%d done), %s %d steps, cfg %g", n, num_shards, size,
              out, len(done), g["method"], g["steps"], g["cfg_scale"])
  began = time.perf_counter()
  for count, k in enumerate(todo, 1):
    lo, hi = k * size, min(n, (k + 1) * size)
    pending = [sample(model, kind.grid_cond(config, model, batch, start), batch_key(g["seed"], k * per_shard + j),
                      noise=initial_noise(g["seed"], np.arange(start, start + batch), shape), **options)
               for j, start in enumerate(range(lo, hi, batch))]  # dispatched together, gathered below
    x0 = np.concatenate([multihost_utils.process_allgather(x, tiled=True) for x in pending])[:hi - lo]
    if x0.shape[1:] != shape:
      raise ValueError(f"the teacher's samples have shape {x0.shape[1:]}, the training latents {shape}")
    done.add(k)
    if is_main:
      x0 = x0.astype(DTYPE)
      labels = np.arange(lo, hi) % want["num_classes"] if g["conditioning"]["kind"] != "text" else np.zeros(hi - lo)
      arrays = {"mean": np.stack([x0, x0[:, :, ::-1]], axis=1), "label": labels.astype(np.int64),
                "index": np.arange(lo, hi, dtype=np.int64)}
      write_atomic(out / shard_name(k), functools.partial(_savez, **arrays))
      manifest.update(shards_done=sorted(done), complete=len(done) == num_shards)
      write_manifest(out, manifest)
    logger.info("teacher samples: shard %d written (%d/%d, %.1f samples/s)", k, len(done), num_shards,
                sum(min(n, (j + 1) * size) - j * size for j in todo[:count]) / (time.perf_counter() - began))
    if on_shard is not None:
      on_shard(k)
  manifest.update(shards_done=sorted(done), complete=True)
  multihost_utils.sync_global_devices("dit_jax teacher samples written")  # the others wait for process 0's files
  return manifest


def training_data(config: ml_collections.ConfigDict, workdir: str | os.PathLike, teacher,
                  mesh: jax.sharding.Mesh) -> ml_collections.ConfigDict:
  """The data config a run trains on: ``config.data``, or (``distill.teacher_data.num_samples`` > 0) source
  'latents' on the teacher-sample directory, generated first (or finished, or reused)."""
  t = config.distill.teacher_data
  if not t.num_samples:
    return config.data
  if teacher is None:
    raise ValueError("distill.teacher_data samples the teacher: it needs teacher.checkpoint and a distillation "
                     "objective")
  out = directory(config, workdir)
  generate(config, teacher, mesh, out)
  d = config.data.copy_and_resolve_references()
  d.source, d.folder, d.random_flip = "latents", str(out), bool(t.random_flip)
  return d
