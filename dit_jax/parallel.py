"""Device mesh and sharding from logical axis names.

Every parameter carries logical axis names (``dit_jax.models.layers.logical``); a rule table maps each name to
mesh axes, as in maxtext / big_vision. The mesh has three axes: ``data`` (pure data parallel), ``fsdp``
(parameters, gradients and optimizer state sharded, batch too) and ``tensor`` (heads / MLP hidden split).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")
# logical name -> mesh axis (or axes); names not listed are replicated.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("mod", "tensor"),
)


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolve one -1 entry so the product equals ``num_devices``."""
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)} has more than one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh shape {tuple(shape)} does not divide {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, have {num_devices}")
  return tuple(shape)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over ``devices`` (default: all global devices), GSPMD (auto) axis types."""
  devices = list(devices if devices is not None else jax.devices())
  resolved = mesh_shape(shape, len(devices))
  if devices == list(jax.devices()):
    return jax.make_mesh(resolved, AXES, axis_types=(AxisType.Auto,) * len(AXES))
  return Mesh(np.asarray(devices).reshape(resolved), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def logical_to_mesh(spec: PartitionSpec | tuple, rules=DEFAULT_RULES, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """Map logical axis names to mesh axes. A mesh axis is used at most once; with ``mesh`` and ``shape``, a dim
  that the mapped axes do not divide is replicated instead."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(tuple(spec)):
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
    if mesh is not None and shape is not None and axes:
      if shape[i] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*out)


def shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for every variable of an NNX state (abstract or concrete), from its logical names."""
  specs = nnx.get_partition_spec(state)
  return jax.tree.map(lambda spec, leaf: NamedSharding(mesh, logical_to_mesh(spec, rules, mesh, leaf.shape)),
                      specs, state, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES, ndim: int = 1) -> NamedSharding:
  """Shard the leading (batch) axis over the mesh axes the 'batch' rule names."""
  return NamedSharding(mesh, logical_to_mesh(("batch",) + (None,) * (ndim - 1), rules, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, rules=DEFAULT_RULES) -> dict[str, jax.Array]:
  """Assemble each host's slice of the batch into global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v)
          for k, v in local.items()}
