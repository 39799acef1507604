"""A training workdir's metadata, ``<workdir>/dit_jax.json``: what ``dit_jax.load(workdir)`` needs to return the
latest EMA model (kind, model config, objective) and how the run was conditioned, read back by samplers."""
from __future__ import annotations

import json
import pathlib

import ml_collections

from dit_jax import checkpoint, data


def write_model_meta(workdir: pathlib.Path, config: ml_collections.ConfigDict, model_cfg,
                     conditioning: dict | None = None) -> None:
  """Write ``<workdir>/dit_jax.json`` atomically; ``training.conditioning`` records how labels become the model's
  conditioning (e.g. an MMDiT's class-token table, ``Kind.conditioning_meta``); ``training.scan_layers`` the
  layout of the checkpoints' blocks (stacked per run; absent in older workdirs: per block)."""
  training = {"checkpoints": "checkpoints", "objective": config.objective, "flow_convention": config.flow.convention,
              "flow_shift": config.flow.shift, "flow_resolution_shift": bool(config.flow.resolution_shift),
              "scan_layers": bool(config.scan_layers)}
  if conditioning is not None:
    training["conditioning"] = conditioning
  if config.teacher.checkpoint:  # a distillation run: the frozen teacher it learns from
    training["teacher"] = str(pathlib.Path(config.teacher.checkpoint).absolute())
  meta = {"format_version": checkpoint.FORMAT_VERSION, "kind": config.model.kind, "config": model_cfg.to_dict(),
          "training": training}
  path = workdir / checkpoint.META
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(meta, indent=2) + "\n")
  tmp.replace(path)


def sampling_shift(training: dict, default=None):
  """The flow shift to sample a training run with, from its metadata's ``training``: 'resolution' (FLUX's mu of
  the latent's tokens) for a run trained with ``flow.resolution_shift``, else its ``flow_shift``, else ``default``
  (e.g. a converted checkpoint, which records no training)."""
  if training.get("flow_resolution_shift"):
    return "resolution"
  return training.get("flow_shift", default)


def class_tokens_of(workdir) -> data.ClassTokens:
  """The class tokens an MMDiT training workdir was trained with (from its ``dit_jax.json``), to turn labels into
  the cond dict for ``dit_jax.sample``: ``class_tokens_of(workdir)(labels)``."""
  spec = checkpoint.read_meta(workdir).get("training", {}).get("conditioning")
  if not spec or spec.get("kind") != "class_tokens":
    raise checkpoint.CheckpointError(f"{workdir} was not trained on class tokens (no training.conditioning of "
                                     "kind 'class_tokens' in its dit_jax.json)")
  return data.class_tokens_from_spec(spec)
