"""The frozen teacher of a distillation run: a dit_jax checkpoint (``teacher.checkpoint``: a converted model or a
training workdir's EMA) of the student's kind and shape, sharded like the student from the same logical axis
names, never updated or saved (the workdir records its path).

The student's parameters start as the teacher's (``teacher.init_student``); the parameters only the student has
(its zero-initialised guidance / interval embedders) keep their own initialisation.
"""
from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dit_jax import kinds, parallel

STUDENT_ONLY = ("guidance_embed", "interval_embed")  # config fields a student may add to its teacher's


@dataclasses.dataclass
class Teacher:
  """graphdef and sharded state of the teacher (``model()`` merges them, inside or outside a jit)."""

  graphdef: nnx.GraphDef
  state: nnx.State
  config: object

  @classmethod
  def load(cls, config: ml_collections.ConfigDict, student_config, mesh: jax.sharding.Mesh) -> Teacher:
    from dit_jax.checkpoint import load

    path = config.teacher.checkpoint
    if not path:
      raise ValueError(f"objective {config.objective!r} needs teacher.checkpoint (a dit_jax checkpoint or workdir)")
    if not pathlib.Path(path).is_dir():
      raise FileNotFoundError(f"teacher.checkpoint {path} not found")
    dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
    model = load(path, dtype)
    kind = kinds.get(config.model.kind)
    if kinds.of(model) is not kind:
      raise ValueError(f"teacher {path} is a {kinds.of(model).name!r} model, the student a {kind.name!r}")
    check_compatible(model.config, student_config, path)
    graphdef, state = nnx.split(model)
    state = jax.device_put(jax.device_get(state), parallel.shardings(state, mesh))
    return cls(graphdef, state, model.config)

  def model(self, state: nnx.State | None = None) -> nnx.Module:
    return nnx.merge(self.graphdef, self.state if state is None else state)


def check_compatible(teacher_config, student_config, path) -> None:
  """One-line error unless the student is the teacher plus student-only inputs."""
  base = lambda c: dataclasses.replace(c, **{f: False for f in STUDENT_ONLY if hasattr(c, f)})
  if base(teacher_config) != base(student_config):
    t, s = dataclasses.asdict(base(teacher_config)), dataclasses.asdict(base(student_config))
    diff = ", ".join(f"{k} {t[k]} vs {s[k]}" for k in t if t[k] != s.get(k))
    raise ValueError(f"teacher {path} and the student differ: {diff} (teacher vs student)")
  added = [f for f in STUDENT_ONLY if getattr(teacher_config, f, False)]
  if added:
    raise ValueError(f"teacher {path} has {', '.join(added)}: distil from a model without it")


def init_from_teacher(params: nnx.State, teacher: nnx.State) -> nnx.State:
  """``params`` with every parameter the teacher has replaced by the teacher's (same paths, shapes checked at
  trace time); parameters only the student has keep theirs."""
  flat = dict(nnx.to_flat_state(params))
  for path, var in nnx.to_flat_state(teacher):
    if path not in flat:
      continue  # the teacher's frozen tables (pos_embed) are not parameters
    if flat[path].shape != var.shape:
      raise ValueError(f"teacher parameter {'.'.join(map(str, path))} has shape {var.shape}, the student's "
                       f"{flat[path].shape}")
    flat[path] = flat[path].replace(var[...].astype(flat[path].dtype))
  return nnx.from_flat_state(flat)
