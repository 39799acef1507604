"""The key-table engine shared by every model family: source key(s) -> NNX parameter path + transform.

A :class:`Rule` names the target parameter path in the NNX state, its source keys, how several sources merge
(``one``, ``concat`` along torch's output axis, or ``tied`` copies that must be identical) and how the merged
tensor maps onto the target (``op``, a key of an ops table). Every op has an exact inverse, so the same table
exports back (:func:`export_table`). A family extends :data:`OPS` with its own ops and passes them as ``ops=``.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.convert.readers import ConversionError

Path = tuple  # NNX state path, e.g. ("blocks", 0, "attn", "qkv", "kernel")
MAX_LISTED = 4


@dataclasses.dataclass(frozen=True)
class Rule:
  target: Path
  sources: tuple[str, ...]
  op: str = "copy"  # copy | T (torch Linear weight) | patch (conv kernel as linear) | batch1 (drop a leading 1)
  merge: str = "one"  # one | concat | tied


def _patch_to_jax(w: np.ndarray) -> np.ndarray:
  d, c, p, _ = w.shape  # torch conv (D, C, p, p) -> rows ordered (row, col, C)
  return w.transpose(2, 3, 1, 0).reshape(p * p * c, d)


def _patch_to_torch(k: np.ndarray, cfg) -> np.ndarray:
  p, c = cfg.patch_size, cfg.in_channels
  return k.reshape(p, p, c, -1).transpose(3, 2, 0, 1)


# op -> (torch -> jax, jax -> torch); ``patch`` (a patch-embedding conv as a linear, DiT and MMDiT) reads the
# config's patch_size and in_channels.
OPS: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda a: a, lambda a, cfg: a),
    "T": (lambda a: a.T, lambda a, cfg: a.T),
    "patch": (_patch_to_jax, _patch_to_torch),
    "batch1": (lambda a: a[0], lambda a, cfg: a[None]),
}


def merge_sources(rule: Rule, arrays: list[np.ndarray]) -> np.ndarray:
  if rule.merge == "concat":
    return np.concatenate(arrays, axis=0)
  if rule.merge == "tied":
    differing = [k for k, a in zip(rule.sources[1:], arrays[1:])
                 if a.shape != arrays[0].shape or not np.array_equal(a, arrays[0])]
    if differing:
      raise ValueError(f"tied copies differ from {rule.sources[0]}: {differing[0]}"
                       + (f" (+{len(differing) - 1} more)" if len(differing) > 1 else "")
                       + "; dit_jax keeps one copy (e.g. one timestep/label embedder for all blocks, as the original "
                       "DiT), so the copies must be identical")
  return arrays[0]


def split_target(rule: Rule, array: np.ndarray) -> list[np.ndarray]:
  n = len(rule.sources)
  if rule.merge == "concat":
    return list(np.split(array, n, axis=0))
  if rule.merge == "tied":
    return [array] * n
  return [array]


def source_shapes(rule: Rule, target_shape: tuple, cfg, ops=OPS) -> list[tuple]:
  """The torch shapes the rule's sources must have to fill a target of ``target_shape``."""
  placeholder = np.broadcast_to(np.float32(0), target_shape)
  return [tuple(a.shape) for a in split_target(rule, ops[rule.op][1](placeholder, cfg))]


def need(tensors: dict, key: str, what: str = "model"):
  """tensors[key], or a one-line ConversionError naming the missing key (it is needed to infer the config)."""
  if key not in tensors:
    raise ConversionError(f"missing key {key} (cannot infer the {what} config)")
  return tensors[key]


def listing(keys) -> str:
  """At most MAX_LISTED sorted keys, then '(+N more)'."""
  keys = sorted(keys)
  more = f" (+{len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else ""
  return ", ".join(keys[:MAX_LISTED]) + more


def key_indices(tensors, pattern: str) -> list[int]:
  """The sorted distinct numbers that ``pattern``'s one ``(\\d+)`` group captures at the start of the keys."""
  return sorted({int(m.group(1)) for k in tensors if (m := re.match(pattern, k))})


def count_numbered(tensors, pattern: str, none: str, gap: Callable[[int, int], str]) -> int:
  """N when the keys matching ``pattern`` (see :func:`key_indices`) are numbered 0..N-1. Otherwise a
  ConversionError: ``none`` when no key matches, ``gap(first skipped index, last index)`` for a hole."""
  found = key_indices(tensors, pattern)
  if not found:
    raise ConversionError(none)
  missing = sorted(set(range(found[-1] + 1)) - set(found))
  if missing:
    raise ConversionError(gap(missing[0], found[-1]))
  return len(found)


def count_blocks(tensors, prefix: str, what: str) -> int:
  """Depth of the block stack ``{prefix}.0.*`` .. ``{prefix}.N-1.*`` (``what`` names the blocks in errors)."""
  return count_numbered(tensors, rf"{re.escape(prefix)}\.(\d+)\.",
                        f"no {prefix}.N.* keys: the checkpoint has no {what}",
                        lambda i, last: f"missing keys for {prefix}.{i} (blocks are not numbered 0..{last})")


def pick_table(layouts: dict[str, Callable], layout: str, what: str) -> Callable:
  """``layouts[layout]``, or a ConversionError listing the ``what`` (e.g. 'MMDiT') layouts."""
  if layout not in layouts:
    raise ConversionError(f"unknown {what} layout {layout!r}; choose one of {', '.join(layouts)}")
  return layouts[layout]


def apply_table(tensors: dict[str, np.ndarray], rules: list[Rule], abstract_module, cfg, *, what: str, ops=OPS,
                computed: dict[Path, Callable] | None = None):
  """Fill an abstract NNX module from a state dict through a key table, strictly: every source key used, every
  parameter filled (by a rule or ``computed``), every shape checked. All problems go into one one-line
  ConversionError naming the offending keys."""
  computed = computed or {}
  graphdef, state = nnx.split(abstract_module)
  flat = nnx.to_flat_state(state)
  targets = {tuple(p): v for p, v in flat}
  values = {path: fn(cfg) for path, fn in computed.items()}
  wanted = {k for r in rules for k in r.sources}
  problems, wrong_shapes = [], []
  missing = sorted(wanted - set(tensors))
  if missing:
    problems.append(f"missing keys: {listing(missing)}")
  for rule in rules:
    if any(k not in tensors for k in rule.sources):
      continue
    expected = source_shapes(rule, targets[rule.target].shape, cfg, ops)
    bad = [f"{k} {tuple(tensors[k].shape)}, expected {shape}" for k, shape in zip(rule.sources, expected)
           if tuple(tensors[k].shape) != shape]
    if bad:
      wrong_shapes += bad
      continue
    try:
      values[rule.target] = ops[rule.op][0](merge_sources(rule, [np.asarray(tensors[k]) for k in rule.sources]))
    except ValueError as e:
      problems.append(str(e))
  if wrong_shapes:
    problems.append(f"wrong shape: {listing(wrong_shapes)}")
  extra = sorted(set(tensors) - wanted)
  if extra:
    problems.append(f"unexpected keys: {listing(extra)}")
  unfilled = set(targets) - {r.target for r in rules} - set(computed)
  if unfilled:  # a table bug, not a user error
    raise AssertionError(f"{what} key table leaves parameters unfilled: {sorted(unfilled)}")
  if problems:
    raise ConversionError(f"{what} state dict does not match the inferred config: " + "; ".join(problems))
  for path, var in flat:
    var.set_value(jnp.asarray(values[tuple(path)], dtype=var.get_value().dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def export_table(model: nnx.Module, rules: list[Rule], ops=OPS) -> dict[str, np.ndarray]:
  """The inverse of :func:`apply_table`: the rules' source keys -> numpy arrays (C-contiguous) from the model."""
  params = {tuple(p): np.asarray(jax.device_get(v[...])) for p, v in nnx.to_flat_state(nnx.state(model))}
  out = {}
  for rule in rules:
    value = ops[rule.op][1](params[rule.target], model.config)
    out.update(zip(rule.sources, map(np.ascontiguousarray, split_target(rule, value))))
  return out
