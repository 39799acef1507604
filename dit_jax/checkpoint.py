"""Checkpoint directories: ``dit_jax.json`` (model kind, config, provenance) + ``params/`` (orbax), and the orbax
manager of a training workdir (:class:`Checkpoints`), whose latest EMA weights ``load`` also reads.

Directories are written to a temporary sibling and renamed into place, so an interrupted or failed write never
leaves a half-written checkpoint and never destroys an existing one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dit_jax import kinds
from dit_jax.models.vae import AutoencoderKL

FORMAT_VERSION = 1
META = "dit_jax.json"
BUNDLED_VAE = "vae"  # a DiT checkpoint directory may carry its VAE as a checkpoint in this subdirectory


class CheckpointError(ValueError):
  """A user-facing problem with a checkpoint directory; the message is one line."""


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[pathlib.Path]:
  """Yield a temporary directory that replaces ``out_dir`` only if the block succeeds."""
  out = pathlib.Path(out_dir).absolute()
  if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
    raise CheckpointError(f"{out} already exists and is not empty (use --overwrite to replace it)")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    yield tmp
    if out.exists():
      old = out.with_name(f".{out.name}.old-{os.getpid()}")
      out.rename(old)
      tmp.rename(out)
      shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
      tmp.rename(out)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)


# Target size of the OCDBT data files a checkpoint is written in: orbax's default (2 GiB) buffers a whole model's
# parameters while saving, a second copy of the model in memory (a converted T5-XXL is 19 GB in float32).
DATA_FILE_BYTES = 64 << 20


def _orbax():
  """orbax.checkpoint, imported on first use: importing it logs through absl, which installs a root log handler
  before the CLIs configure logging (their INFO lines would be lost) and costs every ``import dit_jax``."""
  import orbax.checkpoint

  return orbax.checkpoint


def _checkpointer():
  return _orbax().StandardCheckpointer()


def _write(model: nnx.Module, directory: pathlib.Path, extra: dict[str, Any] | None) -> None:
  meta = {"format_version": FORMAT_VERSION, "kind": kinds.of(model).name, "config": model.config.to_dict(),
          **(extra or {})}
  directory.mkdir(parents=True, exist_ok=True)
  (directory / META).write_text(json.dumps(meta, indent=2) + "\n")
  ocp = _orbax()
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:  # bounded data files: no second copy in memory
    ckptr.save(directory / "params", args=ocp.args.PyTreeSave(canonical_state(model),
                                                              ocdbt_target_data_file_size=DATA_FILE_BYTES))


def canonical_state(model: nnx.Module) -> nnx.State:
  """``nnx.state(model)`` in the canonical per-block layout: a ``scan_layers`` model's stacked blocks unstacked."""
  state = nnx.state(model)
  return kinds.of(model).unstack_blocks(model.config, state) if getattr(model, "scan_layers", False) else state


def save(model: nnx.Module, out_dir: str | os.PathLike, *, overwrite: bool = False,
         extra: dict[str, Any] | None = None, vae: nnx.Module | None = None,
         vae_extra: dict[str, Any] | None = None,
         bundle: Callable[[pathlib.Path], None] | None = None) -> pathlib.Path:
  """Write ``model`` (config + all parameters, including frozen tables) as a checkpoint directory, always in the
  per-block layout (a ``scan_layers`` model's blocks unstacked); ``vae`` is bundled as ``<out_dir>/vae`` so
  samplers can decode to images; ``bundle(tmp_dir)`` writes further parts (the text encoders) before the
  directory appears, so a failure leaves nothing half-written."""
  with atomic_directory(out_dir, overwrite) as tmp:
    _write(model, tmp, extra)
    if vae is not None:
      _write(vae, tmp / BUNDLED_VAE, vae_extra)
    if bundle is not None:
      bundle(tmp)
  return pathlib.Path(out_dir)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
  path = pathlib.Path(path)
  meta_path = path / META
  if not path.is_dir():
    raise CheckpointError(f"{path} is not a checkpoint directory")
  if not meta_path.exists():
    raise CheckpointError(f"{path} is not a dit_jax checkpoint (no {META}); convert it with tools/convert_torch.py")
  try:
    meta = json.loads(meta_path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{meta_path} is corrupt ({e})") from None
  if meta.get("kind") not in kinds.KINDS:
    raise CheckpointError(f"{meta_path}: unknown model kind {meta.get('kind')!r}")
  if meta.get("format_version", 0) > FORMAT_VERSION:
    raise CheckpointError(f"{meta_path}: format version {meta['format_version']} is newer than this dit_jax")
  return meta


def load(path: str | os.PathLike, dtype=jnp.float32, *, param_dtype=jnp.float32,
         attention_impl: str = "auto") -> nnx.Module:
  """Load a checkpoint directory as a ready NNX module (``model.config`` holds its hyper-parameters).

  Always the per-block model (``scan_layers`` off), also for a training workdir trained with ``scan_layers``.

  Args:
    path: directory written by ``tools/convert_torch.py`` or :func:`save`, or a training workdir.
    dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters are stored as ``param_dtype``.
    attention_impl: 'auto' | 'xla' | 'cudnn' | 'splash'.
  """
  path = pathlib.Path(path).absolute()
  meta = read_meta(path)
  kind = kinds.get(meta["kind"])
  try:
    config = kind.config.from_dict(meta["config"])
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{path / META}: {e}") from None
  build = lambda scan: nnx.eval_shape(lambda: kind.build(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                                        attention_impl=attention_impl, scan_layers=scan))
  abstract = build(False)
  if "training" in meta:  # a training workdir: its latest EMA weights, as trained (scan_layers: blocks stacked)
    scanned = bool(meta["training"].get("scan_layers", False))
    return _load_training_ema(path, abstract, build(True) if scanned else None)
  graphdef, abstract_state = nnx.split(abstract)
  try:
    state = _checkpointer().restore(path / "params", abstract_state)
  except Exception as e:  # noqa: BLE001 - orbax raises many types; report one line
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CheckpointError(f"{path / 'params'} cannot be restored ({first})") from None
  return nnx.merge(graphdef, state)


def load_vae(path: str | os.PathLike, dtype=jnp.float32, *, param_dtype=jnp.float32,
             attention_impl: str = "auto") -> AutoencoderKL:
  """A VAE from a VAE checkpoint directory or from a model directory that bundles one (``<path>/vae``)."""
  path = pathlib.Path(path)
  for candidate in (path, path / BUNDLED_VAE):
    if (candidate / META).exists() and read_meta(candidate)["kind"] == "vae":
      return load(candidate, dtype, param_dtype=param_dtype, attention_impl=attention_impl)
  raise CheckpointError(f"{path} holds no VAE (neither a VAE checkpoint nor a bundled {BUNDLED_VAE}/ directory)")


class Checkpoints:
  """orbax CheckpointManager over <workdir>/checkpoints. Items: 'train' (TrainState without the EMA), 'ema' and
  'rest' (the EMA parameters and frozen tables: all ``dit_jax.load`` reads) and 'extra' (JSON: input position).
  Async saves; keeps the last N plus every K-th step."""

  ITEMS = ("train", "ema", "rest", "extra")

  def __init__(self, workdir: pathlib.Path, config: ml_collections.ConfigDict | None = None):
    ocp = _orbax()
    self.args = ocp.args
    if config is None:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                             keep_period=config.keep_period or None, create=True,
                                             enable_async_checkpointing=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(pathlib.Path(workdir).absolute() / "checkpoints", options=options,
                                         item_names=self.ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, rest: nnx.State, extra: dict) -> None:
    """Save a ``trainer.TrainState`` (async); an empty ``rest`` (a model without frozen tables) is not stored."""
    a = self.args
    items = dict(train=a.StandardSave(_train_item(state)), ema=a.StandardSave(state.ema), extra=a.JsonSave(extra))
    if jax.tree.leaves(rest):
      items["rest"] = a.StandardSave(rest)
    self.manager.save(step, args=a.Composite(**items), force=True)

  def restore(self, step: int, abstract_state, abstract_rest):
    a = self.args
    items = dict(train=a.StandardRestore(_train_item(abstract_state)), ema=a.StandardRestore(abstract_state.ema),
                 extra=a.JsonRestore())
    out = self.manager.restore(step, args=a.Composite(**items, **self._rest(abstract_rest)))
    return abstract_state.replace(**{**out["train"], "ema": out["ema"]}), out.get("rest", abstract_rest), out["extra"]

  def restore_ema(self, step: int, abstract_params, abstract_rest):
    a = self.args
    out = self.manager.restore(step, args=a.Composite(ema=a.StandardRestore(abstract_params),
                                                      **self._rest(abstract_rest)))
    return out["ema"], out.get("rest", abstract_rest)

  def _rest(self, abstract_rest) -> dict:
    return {"rest": self.args.StandardRestore(abstract_rest)} if jax.tree.leaves(abstract_rest) else {}

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


OPTIONAL_FIELDS = ("aux_params", "aux_opt_state")  # TrainState fields stored only when set (LADD's discriminator)


def _train_item(state) -> dict:
  """The 'train' item: the TrainState's fields as a dict, the EMA None (its own item), the optional fields only
  when set, so the checkpoints of other objectives keep the layout written before those fields existed."""
  item = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
  item["ema"] = None
  return {k: v for k, v in item.items() if not (k in OPTIONAL_FIELDS and v is None)}


def _load_training_ema(path: pathlib.Path, abstract: nnx.Module, stacked: nnx.Module | None) -> nnx.Module:
  """The EMA weights of the latest checkpoint of a training workdir as ``abstract`` (per block); ``stacked``: the
  abstract ``scan_layers`` model the run trained (its checkpoints' layout), or None."""
  ckpts = Checkpoints(path)
  step = ckpts.latest_step()
  if step is None:
    raise CheckpointError(f"{path} is a training directory without any checkpoint yet")
  graphdef, params, rest = nnx.split(stacked or abstract, nnx.Param, ...)
  ema, rest = ckpts.restore_ema(step, params, rest)
  ckpts.close()
  model = nnx.merge(graphdef, ema, rest)
  return model if stacked is None else nnx.merge(nnx.graphdef(abstract), canonical_state(model))


def flat_params(model: nnx.Module) -> dict[tuple, np.ndarray]:
  """{state path: numpy array} of every variable in the model (per-block layout, see :func:`canonical_state`)."""
  return {tuple(path): np.asarray(jax.device_get(var[...]))
          for path, var in nnx.to_flat_state(canonical_state(model))}
