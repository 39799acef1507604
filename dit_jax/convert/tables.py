"""Declarative key tables: one per checkpoint layout, source key(s) -> NNX parameter path + transform.

A :class:`Rule` names the target parameter path in the NNX state, its source keys, how several sources merge
(``one``, ``concat`` along torch's output axis, or ``tied`` copies that must be identical) and how the merged
tensor maps onto the target (``op``). Every op has an exact inverse, so the same table exports back.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
import numpy as np

from dit_jax.convert.readers import ConversionError
from dit_jax.models.dit import DiTConfig
from dit_jax.models.layers import sincos_2d

Path = tuple  # NNX state path, e.g. ("blocks", 0, "attn", "qkv", "kernel")


@dataclasses.dataclass(frozen=True)
class Rule:
  target: Path
  sources: tuple[str, ...]
  op: str = "copy"  # copy | T (torch Linear weight) | patch (conv kernel as linear) | batch1 (drop a leading 1)
  merge: str = "one"  # one | concat | tied


def _patch_to_jax(w: np.ndarray) -> np.ndarray:
  d, c, p, _ = w.shape  # torch conv (D, C, p, p) -> rows ordered (row, col, C)
  return w.transpose(2, 3, 1, 0).reshape(p * p * c, d)


def _patch_to_torch(k: np.ndarray, cfg: DiTConfig) -> np.ndarray:
  p, c = cfg.patch_size, cfg.in_channels
  return k.reshape(p, p, c, -1).transpose(3, 2, 0, 1)


# op -> (torch -> jax, jax -> torch)
OPS: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda a: a, lambda a, cfg: a),
    "T": (lambda a: a.T, lambda a, cfg: a.T),
    "patch": (_patch_to_jax, _patch_to_torch),
    "batch1": (lambda a: a[0], lambda a, cfg: a[None]),
}


def _linear(target: Path, source: str, merge: str = "one", copies: tuple[str, ...] | None = None) -> list[Rule]:
  """kernel + bias of one Linear; ``copies`` lists prefixes for tied/concat sources instead of ``source``."""
  prefixes = copies or (source,)
  return [Rule(target + ("kernel",), tuple(f"{p}.weight" for p in prefixes), "T", merge),
          Rule(target + ("bias",), tuple(f"{p}.bias" for p in prefixes), "copy", merge)]


def original_table(cfg: DiTConfig) -> list[Rule]:
  """facebookresearch/DiT ``models.py`` state dict (the released DiT-XL-2-*.pt layout)."""
  rules = [
      Rule(("pos_embed",), ("pos_embed",), "batch1"),
      Rule(("x_embedder", "proj", "kernel"), ("x_embedder.proj.weight",), "patch"),
      Rule(("x_embedder", "proj", "bias"), ("x_embedder.proj.bias",)),
      *_linear(("t_embedder", "fc1"), "t_embedder.mlp.0"),
      *_linear(("t_embedder", "fc2"), "t_embedder.mlp.2"),
      Rule(("y_embedder", "embedding_table", "embedding"), ("y_embedder.embedding_table.weight",)),
  ]
  for i in range(cfg.depth):
    src, dst = f"blocks.{i}", ("blocks", i)
    rules += _linear(dst + ("attn", "qkv"), f"{src}.attn.qkv")
    rules += _linear(dst + ("attn", "proj"), f"{src}.attn.proj")
    rules += _linear(dst + ("mlp", "fc1"), f"{src}.mlp.fc1")
    rules += _linear(dst + ("mlp", "fc2"), f"{src}.mlp.fc2")
    rules += _linear(dst + ("adaLN_modulation",), f"{src}.adaLN_modulation.1")
  rules += _linear(("final_layer", "adaLN_modulation"), "final_layer.adaLN_modulation.1")
  rules += _linear(("final_layer", "linear"), "final_layer.linear")
  return rules


def diffusers_table(cfg: DiTConfig) -> list[Rule]:
  """diffusers ``DiTTransformer2DModel`` (and legacy ``Transformer2DModel`` ada_norm_zero) state dict.

  diffusers keeps a copy of the timestep and label embedders in every block (``norm1.emb``); the copies are
  tied here and must be identical. ``pos_embed`` is not stored (diffusers recomputes it).
  """
  blocks = [f"transformer_blocks.{i}" for i in range(cfg.depth)]
  emb = [f"{b}.norm1.emb" for b in blocks]
  rules = [
      Rule(("x_embedder", "proj", "kernel"), ("pos_embed.proj.weight",), "patch"),
      Rule(("x_embedder", "proj", "bias"), ("pos_embed.proj.bias",)),
      *_linear(("t_embedder", "fc1"), "", "tied", tuple(f"{e}.timestep_embedder.linear_1" for e in emb)),
      *_linear(("t_embedder", "fc2"), "", "tied", tuple(f"{e}.timestep_embedder.linear_2" for e in emb)),
      Rule(("y_embedder", "embedding_table", "embedding"),
           tuple(f"{e}.class_embedder.embedding_table.weight" for e in emb), "copy", "tied"),
  ]
  for i, b in enumerate(blocks):
    dst = ("blocks", i)
    rules += _linear(dst + ("attn", "qkv"), "", "concat", tuple(f"{b}.attn1.to_{x}" for x in "qkv"))
    rules += _linear(dst + ("attn", "proj"), f"{b}.attn1.to_out.0")
    rules += _linear(dst + ("mlp", "fc1"), f"{b}.ff.net.0.proj")
    rules += _linear(dst + ("mlp", "fc2"), f"{b}.ff.net.2")
    rules += _linear(dst + ("adaLN_modulation",), f"{b}.norm1.linear")
  rules += _linear(("final_layer", "adaLN_modulation"), "proj_out_1")
  rules += _linear(("final_layer", "linear"), "proj_out_2")
  return rules


TABLES = {"original": original_table, "diffusers": diffusers_table}
# Parameters a layout does not store, computed from the config instead (diffusers rebuilds the sin-cos table).
COMPUTED: dict[str, dict[Path, Callable[[DiTConfig], np.ndarray]]] = {
    "original": {},
    "diffusers": {("pos_embed",): lambda cfg: sincos_2d(cfg.hidden_size, cfg.grid_size, cfg.grid_size)},
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


MAX_LISTED = 4


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


def apply_table(tensors: dict[str, np.ndarray], rules: list[Rule], abstract_module, cfg, *, what: str, ops=OPS,
                computed: dict[Path, Callable] | None = None):
  """Fill an abstract NNX module from a state dict through a key table, strictly: every source key used, every
  parameter filled (by a rule or ``computed``), every shape checked. All problems go into one one-line
  ConversionError naming the offending keys."""
  from flax import nnx


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
