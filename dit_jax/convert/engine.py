"""The key-table engine shared by every model family: source key(s) -> NNX parameter path + transform.

A :class:`Rule` names the target parameter path in the NNX state, its source keys, how several sources merge
(``one``, ``concat`` along torch's output axis, or ``tied`` copies that must be identical) and how the merged
tensor maps onto the target (``op``, a key of an ops table). Every op has an exact inverse, so the same table
exports back (:func:`export_table`). A family extends :data:`OPS` with its own ops and passes them as ``ops=``.

Strict: :func:`apply_table` refuses missing, unexpected, wrongly shaped, non-float (:data:`FLOAT_DTYPES`) and
NaN / Inf sources; :func:`checked_config` and :func:`config_agrees` let a family's ``infer_config`` refuse a
diffusers config.json that is malformed, names another model class or contradicts the weights. Streaming: the
sources may be :class:`~dit_jax.convert.readers.LazyTensor` s, read one rule at a time.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from dit_jax.convert.readers import ConversionError, Tensor, materialise

Path = tuple  # NNX state path, e.g. ("blocks", 0, "attn", "qkv", "kernel")
MAX_LISTED = 4
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")  # the only source dtypes a conversion accepts


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


def _tied_differ(rule: Rule, differing: list[str]) -> ValueError:
  return ValueError(f"tied copies differ from {rule.sources[0]}: {differing[0]}"
                    + (f" (+{len(differing) - 1} more)" if len(differing) > 1 else "")
                    + "; dit_jax keeps one copy (e.g. one timestep/label embedder for all blocks, as the original "
                    "DiT), so the copies must be identical")


def merge_sources(rule: Rule, arrays: list[np.ndarray]) -> np.ndarray:
  if rule.merge == "concat":
    return np.concatenate(arrays, axis=0)
  if rule.merge == "tied":
    differing = [k for k, a in zip(rule.sources[1:], arrays[1:])
                 if a.shape != arrays[0].shape or not np.array_equal(a, arrays[0], equal_nan=True)]
    if differing:
      raise _tied_differ(rule, differing)
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


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def checked_config(config, classes: tuple[str, ...], *int_fields: str, int_lists: tuple[str, ...] = (),
                   numbers: tuple[str, ...] = ()) -> dict[str, Any]:
  """diffusers' ``config.json`` (already parsed; None when the source has none -> ``{}``), checked before any of
  it is used: a JSON object whose ``_class_name``, when present, is one of ``classes``; each of ``int_fields``
  a positive int, each of ``int_lists`` a list of non-negative ints and each of ``numbers`` a number, where
  present and not null. Otherwise a one-line ConversionError naming the field."""
  if config is None:
    return {}
  if not isinstance(config, dict):
    raise ConversionError(f"config.json is not a JSON object (got {type(config).__name__})")
  name = config.get("_class_name")
  if name is not None and name not in classes:
    raise ConversionError(f"config.json describes {name!r}, not {' / '.join(classes)}: it does not belong to "
                          "these weights")
  for field in int_fields:
    v = config.get(field)
    if v is not None and not (_is_int(v) and v > 0):
      raise ConversionError(f"config.json {field}={v!r} is not a positive integer")
  for field in int_lists:
    v = config.get(field)
    if v is not None and not (isinstance(v, (list, tuple)) and all(_is_int(x) and x >= 0 for x in v)):
      raise ConversionError(f"config.json {field}={v!r} is not a list of non-negative integers")
  for field in numbers:
    v = config.get(field)
    if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)):
      raise ConversionError(f"config.json {field}={v!r} is not a finite number")
  return config


def config_agrees(config: dict[str, Any], *, nullable: tuple[str, ...] = (), **weights) -> None:
  """A one-line ConversionError naming every ``config.json`` field that contradicts the value the weights show
  (``weights``: field -> value from the shapes / keys). A field that is absent, or null and not ``nullable`` (a
  null that means 'the default'), is not compared; lists compare as tuples."""
  def norm(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v

  bad = [f"{k}={config[k]!r} but the weights have {v!r}" for k, v in weights.items()
         if k in config and (config[k] is not None or k in nullable) and norm(config[k]) != norm(v)]
  if bad:
    raise ConversionError(f"config.json contradicts the weights: {'; '.join(bad)}")


def pick_table(layouts: dict[str, Callable], layout: str, what: str) -> Callable:
  """``layouts[layout]``, or a ConversionError listing the ``what`` (e.g. 'MMDiT') layouts."""
  if layout not in layouts:
    raise ConversionError(f"unknown {what} layout {layout!r}; choose one of {', '.join(layouts)}")
  return layouts[layout]


def _source_problems(tensors, rules: list[Rule], targets: dict, cfg, ops) -> list[str]:
  """Missing / wrongly shaped / unexpected / non-float source keys, from shapes and dtypes alone (nothing read)."""
  wanted = {k for r in rules for k in r.sources}
  problems, wrong_shapes = [], []
  missing = sorted(wanted - set(tensors))
  if missing:
    problems.append(f"missing keys: {listing(missing)}")
  for rule in rules:
    if any(k not in tensors for k in rule.sources):
      continue
    expected = source_shapes(rule, targets[rule.target].shape, cfg, ops)
    wrong_shapes += [f"{k} {tuple(tensors[k].shape)}, expected {shape}" for k, shape in zip(rule.sources, expected)
                     if tuple(tensors[k].shape) != shape]
  if wrong_shapes:
    problems.append(f"wrong shape: {listing(wrong_shapes)}")
  extra = sorted(set(tensors) - wanted)
  if extra:
    problems.append(f"unexpected keys: {listing(extra)}")
  not_float = [f"{k} ({np.dtype(tensors[k].dtype).name})" for k in sorted(wanted & set(tensors))
               if np.dtype(tensors[k].dtype).name not in FLOAT_DTYPES]
  if not_float:
    problems.append(f"not a float dtype ({'/'.join(FLOAT_DTYPES)}): {listing(not_float)}")
  return problems


def has_nonfinite(array: np.ndarray, chunk: int = 1 << 24) -> bool:
  """True when ``array`` holds a NaN or an infinity (checked ``chunk`` values at a time: no full-size mask)."""
  flat = array.reshape(-1)
  return any(not np.isfinite(flat[i:i + chunk]).all() for i in range(0, flat.size, chunk))


def _read_sources(rule: Rule, tensors, nonfinite: list[str], allow_nonfinite: bool) -> np.ndarray:
  """The rule's merged source (see :func:`merge_sources`), reading its tensors one at a time: a tied copy is
  compared with the first and dropped. Keys with NaN / Inf values are appended to ``nonfinite``."""
  def read(key):
    a = materialise(tensors[key])
    if not allow_nonfinite and has_nonfinite(a):
      nonfinite.append(key)
    return a

  if rule.merge != "tied":
    return merge_sources(rule, [read(k) for k in rule.sources])
  first = read(rule.sources[0])
  differing = [k for k in rule.sources[1:] if not np.array_equal(read(k), first, equal_nan=True)]
  if differing:
    raise _tied_differ(rule, differing)
  return first


def _fill(var: nnx.Variable, value: np.ndarray) -> None:
  """Set an abstract parameter to ``value`` in its own dtype: one host copy at most, then the device array
  (``device_put``: no per-shape compilation)."""
  var.set_value(jax.device_put(np.asarray(value, dtype=var.get_value().dtype)))


def apply_table(tensors: dict[str, Tensor], rules: list[Rule], abstract_module, cfg, *, what: str, ops=OPS,
                computed: dict[Path, Callable] | None = None, allow_nonfinite: bool = False):
  """Fill an abstract NNX module (``nnx.eval_shape``) from a state dict through a key table, strictly and
  streaming.

  First, from shapes and dtypes alone: every source key used, every parameter filled (by a rule or ``computed``),
  every shape as the config implies, every source a float tensor (:data:`FLOAT_DTYPES`). Then rule by rule: the
  sources are read (a :class:`~dit_jax.convert.readers.LazyTensor` only now), checked for NaN / Inf (unless
  ``allow_nonfinite``), transformed and written into the parameter, and released, so the peak memory is the
  model plus about one source tensor. All problems go into one one-line ConversionError naming the offending keys.

  Args:
    tensors: source key -> numpy array or LazyTensor (a caller's dict is not modified).
    rules: the key table; ``ops`` the transforms its rules name.
    abstract_module: the model from ``nnx.eval_shape`` (no memory for parameters yet).
    cfg: the model config (for ops and ``computed``).
    what: names the state dict in errors (e.g. 'diffusers MMDiT').
    computed: parameter path -> fn(cfg) for parameters a layout does not store.
    allow_nonfinite: convert NaN / Inf values instead of refusing them.
  """
  computed = computed or {}
  graphdef, state = nnx.split(abstract_module)
  flat = nnx.to_flat_state(state)
  targets = {tuple(p): v for p, v in flat}
  unfilled = set(targets) - {r.target for r in rules} - set(computed)
  if unfilled:  # a table bug, not a user error
    raise AssertionError(f"{what} key table leaves parameters unfilled: {sorted(unfilled)}")
  problems = _source_problems(tensors, rules, targets, cfg, ops)
  if problems:
    raise ConversionError(f"{what} state dict does not match the inferred config: " + "; ".join(problems))
  nonfinite: list[str] = []
  for rule in rules:
    try:
      merged = _read_sources(rule, tensors, nonfinite, allow_nonfinite)
    except ValueError as e:
      problems.append(str(e))
      continue
    if not (problems or nonfinite):  # after a problem, only look for more
      _fill(targets[rule.target], ops[rule.op][0](merged))
    del merged
  if nonfinite:
    raise ConversionError(f"{what} state dict has NaN or Inf values in {listing(nonfinite)} (pass "
                          "allow_nonfinite=True / --allow-nonfinite to convert them anyway)")
  if problems:
    raise ConversionError(f"{what} state dict does not match the inferred config: " + "; ".join(problems))
  for path, fn in computed.items():
    _fill(targets[path], fn(cfg))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def export_table(model: nnx.Module, rules: list[Rule], ops=OPS) -> dict[str, np.ndarray]:
  """The inverse of :func:`apply_table`: the rules' source keys -> numpy arrays (C-contiguous) from the model."""
  params = {tuple(p): np.asarray(jax.device_get(v[...])) for p, v in nnx.to_flat_state(nnx.state(model))}
  out = {}
  for rule in rules:
    value = ops[rule.op][1](params[rule.target], model.config)
    out.update(zip(rule.sources, map(np.ascontiguousarray, split_target(rule, value))))
  return out
