"""Building blocks shared by the model families: embeddings, modulation, norms, attention block, MLP,
(un)patchify, remat policies, stacked (scanned) layers and the build-option checks.

Shapes: B batch, T tokens, D hidden size. All activations are channels-last.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.models.attention import IMPLEMENTATIONS, dot_product_attention

xavier_uniform = nnx.initializers.xavier_uniform()
normal_002 = nnx.initializers.normal(stddev=0.02)
zeros = nnx.initializers.zeros_init()


class FrozenParam(nnx.Variable):
  """A stored tensor that is part of the checkpoint but never trained (e.g. DiT's sin-cos pos_embed)."""


# Activation checkpointing per block: none, everything recomputed, or matmul outputs without a batch dim saved.
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def check_build_options(attention_impl: str, remat: str) -> None:
  """One-line ValueErrors for an unknown attention implementation or remat policy."""
  if attention_impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention_impl {attention_impl!r} is not one of {IMPLEMENTATIONS}")
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat {remat!r} is not one of {', '.join(REMAT_POLICIES)}")


def logical(*names: str | None) -> dict:
  """Variable metadata naming each axis logically ('embed', 'mlp', 'heads', ...); mesh rules map the names to
  mesh axes (:mod:`dit_jax.parallel`). Recorded only: placement happens when a train state is sharded."""
  return {"sharding_names": names, "eager_sharding": False}


# ---------------------------------------------------------------------------------------------------------------
# Sinusoidal tables


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0, freq_shift: float = 0.0):
  """Sinusoidal timestep features, ordered [cos, sin] as DiT.

  freqs_i = exp(-ln(max_period) * i / (dim/2 - freq_shift)); the original DiT uses freq_shift 0, diffusers 1.
  The exponent is formed in float32 in the references' operation order and exponentiated in float64 then rounded
  once, which agrees with torch.exp to the last bit on all but a few frequencies.

  Args:
    t: (B,) float timesteps in the model's own units (0..999 for DiT).
  Returns:
    (B, dim) float32.
  """
  half = dim // 2
  exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
  freqs = np.exp((exponent / np.float32(half - freq_shift)).astype(np.float64)).astype(np.float32)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """(M,) positions -> (M, dim) table ordered [sin, cos], float64 (MAE / DiT convention)."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Fixed 2-D sin-cos positional table, (grid_h * grid_w, dim) float32, row-major tokens.

  The first half of the channels encodes the column (w) index, the second half the row (h) index,
  computed in float64 and rounded once, exactly as facebookresearch/DiT and diffusers do.
  """
  if dim % 4:
    raise ValueError(f"hidden size {dim} must be divisible by 4 for the 2-D sin-cos table")
  cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))
  table = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
  return table.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Normalisation and modulation


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """LayerNorm without affine parameters over the last axis; statistics in float32, result in x's dtype."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  centred = x32 - mean
  var = jnp.mean(jnp.square(centred), -1, keepdims=True)
  return (centred * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis with a learnable scale; statistics in float32 (diffusers): (..., D) -> (..., D)."""

  def __init__(self, dim: int, *, param_dtype, eps: float):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), **logical(None))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
    return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN modulation: x (B, T, D) * (1 + scale (B, D)) + shift (B, D)."""
  return x * (1 + scale[:, None]) + shift[:, None]


# ---------------------------------------------------------------------------------------------------------------
# Modules


class Linear(nnx.Linear):
  """nnx.Linear applied to the tokens flattened to 2-D: (..., T, D_in) -> (..., T, D_out).

  Same parameters (``kernel``, ``bias``) and result as nnx.Linear. On XLA:CPU the weight gradient of a 2-D matmul
  runs about 1.8x faster than the same contraction over (B, T, D) activations (BENCHMARKS.md, train step).
  """

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if inputs.ndim <= 2:
      return super().__call__(inputs)
    return super().__call__(inputs.reshape(-1, inputs.shape[-1])).reshape(*inputs.shape[:-1], -1)


def linear(d_in: int, d_out: int, rngs: nnx.Rngs, *, dtype, param_dtype, axes: tuple[str | None, str | None],
           kernel_init=xavier_uniform, bias_init=zeros, use_bias: bool = True) -> Linear:
  """Linear with DiT's default init (xavier-uniform weight, zero bias) and logical axis names (in, out)."""
  return Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
                bias_init=bias_init, rngs=rngs, kernel_metadata=logical(*axes), bias_metadata=logical(axes[1]))


class PatchEmbed(nnx.Module):
  """Non-overlapping p x p patches -> tokens: (B, H, W, C) -> (B, H/p * W/p, D), row-major.

  A stride-p convolution written as patchify + linear; the kernel rows are ordered (row in patch, col in patch, C),
  so xavier fans are (p*p*C, D) as in DiT's initialisation.
  """

  def __init__(self, patch_size: int, in_channels: int, hidden_size: int, rngs: nnx.Rngs, *, dtype, param_dtype):
    self.patch_size = patch_size
    self.proj = linear(patch_size * patch_size * in_channels, hidden_size, rngs, dtype=dtype, param_dtype=param_dtype,
                       axes=(None, "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    p = self.patch_size
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return self.proj(x.reshape(b, (h // p) * (w // p), p * p * c))


class TimestepEmbedder(nnx.Module):
  """t (B,) -> sinusoidal features (B, 256) -> MLP [Linear, SiLU, Linear] -> (B, D). ``zero_out``: the last
  Linear starts at zero (an added input that leaves a pretrained model unchanged until trained)."""

  def __init__(self, hidden_size: int, rngs: nnx.Rngs, *, freq_dim: int = 256, freq_shift: float = 0.0,
               zero_out: bool = False, dtype, param_dtype):
    self.freq_dim = freq_dim
    self.freq_shift = freq_shift
    kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=normal_002)
    self.fc1 = linear(freq_dim, hidden_size, rngs, axes=(None, "embed"), **kw)
    self.fc2 = linear(hidden_size, hidden_size, rngs, axes=("embed", None),
                      **{**kw, "kernel_init": zeros if zero_out else normal_002})

  def __call__(self, t: jax.Array) -> jax.Array:
    features = timestep_embedding(t, self.freq_dim, freq_shift=self.freq_shift)
    return self.fc2(nnx.silu(self.fc1(features)))


SCALAR_INPUTS = {"guidance": 1000.0, "interval": 1.0}  # name -> factor before the sinusoidal embedding


def scalar_embedders(hidden_size: int, rngs: nnx.Rngs, *, guidance: bool, interval: bool, freq_shift: float,
                     dtype, param_dtype) -> tuple[TimestepEmbedder | None, TimestepEmbedder | None]:
  """The optional (guidance, interval) embedders of a DiT / MMDiT, their last Linear zero so that adding them to a
  pretrained model changes nothing until they are trained."""
  make = lambda on: TimestepEmbedder(hidden_size, rngs, freq_shift=freq_shift, zero_out=True, dtype=dtype,
                                     param_dtype=param_dtype) if on else None
  return make(guidance), make(interval)


def add_scalar_inputs(c: jax.Array, embedders: dict[str, TimestepEmbedder | None], values: dict) -> jax.Array:
  """c (B, D) + embedder(factor * value) for each scalar input (``SCALAR_INPUTS``) the model has: guidance g
  (FLUX.1's 1000 g), the MeanFlow interval; one-line errors for an input given to a model without its embedder
  and the reverse."""
  for name, embedder in embedders.items():
    value = values.get(name)
    if (embedder is None) != (value is None):
      raise ValueError(f"this model takes a {name} input (config.{name}_embed=True)" if value is None else
                       f"this model has no {name} input (config.{name}_embed=False)")
    if embedder is not None:
      value = jnp.broadcast_to(jnp.asarray(value, jnp.float32), c.shape[:1])
      c = c + embedder(SCALAR_INPUTS[name] * value).astype(c.dtype)
  return c


class LabelEmbedder(nnx.Module):
  """Class ids (B,) -> (B, D). Row ``num_classes`` is the null class used for classifier-free guidance.

  Label dropout (training only) replaces ids by the null class with probability ``dropout_prob``.
  """

  def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, rngs: nnx.Rngs, *, param_dtype):
    self.num_classes = num_classes
    self.dropout_prob = dropout_prob
    rows = num_classes + int(dropout_prob > 0)
    self.embedding_table = nnx.Embed(rows, hidden_size, param_dtype=param_dtype, embedding_init=normal_002,
                                     rngs=rngs, embedding_metadata=logical(None, "embed"))

  def token_drop(self, labels: jax.Array, key: jax.Array | None, force_drop_ids: jax.Array | None) -> jax.Array:
    if force_drop_ids is not None:
      drop = force_drop_ids == 1
    else:
      drop = jax.random.uniform(key, labels.shape) < self.dropout_prob
    return jnp.where(drop, self.num_classes, labels)

  def __call__(self, labels: jax.Array, dropout_key: jax.Array | None = None,
               force_drop_ids: jax.Array | None = None) -> jax.Array:
    if (dropout_key is not None and self.dropout_prob > 0) or force_drop_ids is not None:
      labels = self.token_drop(labels, dropout_key, force_drop_ids)
    return self.embedding_table(labels)


class Attention(nnx.Module):
  """Self-attention with a fused qkv projection: (B, T, D) -> (B, T, D).

  qkv output rows are [q | k | v], each split head-major into contiguous head_dim blocks (timm / DiT layout).
  """

  def __init__(self, hidden_size: int, num_heads: int, rngs: nnx.Rngs, *, dtype, param_dtype,
               implementation: str = "auto"):
    if hidden_size % num_heads:
      raise ValueError(f"hidden size {hidden_size} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.implementation = implementation
    self.qkv = linear(hidden_size, 3 * hidden_size, rngs, dtype=dtype, param_dtype=param_dtype, axes=("embed", "heads"))
    self.proj = linear(hidden_size, hidden_size, rngs, dtype=dtype, param_dtype=param_dtype, axes=("heads", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
    out = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], implementation=self.implementation)
    return self.proj(out.reshape(b, t, d))


class Mlp(nnx.Module):
  """fc1 -> GELU(tanh) -> fc2: (B, T, D) -> (B, T, D)."""

  def __init__(self, hidden_size: int, mlp_hidden: int, rngs: nnx.Rngs, *, dtype, param_dtype):
    self.fc1 = linear(hidden_size, mlp_hidden, rngs, dtype=dtype, param_dtype=param_dtype, axes=("embed", "mlp"))
    self.fc2 = linear(mlp_hidden, hidden_size, rngs, dtype=dtype, param_dtype=param_dtype, axes=("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


def unpatchify(x: jax.Array, patch_size: int, channels: int, grid_h: int, grid_w: int) -> jax.Array:
  """(B, h*w, p*p*C) tokens -> (B, h*p, w*p, C) image; token features ordered (row in patch, col in patch, C)."""
  b = x.shape[0]
  p = patch_size
  x = x.reshape(b, grid_h, grid_w, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid_h * p, grid_w * p, channels)


# ---------------------------------------------------------------------------------------------------------------
# Stacked layers (scan_layers)

LAYER_AXIS = "layers"  # logical name of a stacked layer axis; no mesh rule names it, so it is replicated


def _names(var: nnx.Variable) -> tuple | None:
  return var.get_metadata().get("out_sharding")


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _stack(vs: Sequence[nnx.Variable]) -> nnx.Variable:
  names = _names(vs[0])
  return vs[0].replace(jnp.stack([v.get_value() for v in vs]), **({} if names is None else
                                                                   {"out_sharding": (LAYER_AXIS, *names)}))


def _take(v: nnx.Variable, index: Any = None) -> nnx.Variable:
  names = _names(v)
  value = v.get_value() if index is None else v.get_value()[index]
  return v.replace(value, **({} if names is None else {"out_sharding": names[1:]}))


def stack_states(states: Sequence[nnx.State]) -> nnx.State:
  """Same-structure states -> one whose every variable has a leading (len(states),) axis named 'layers'."""
  return jax.tree.map(lambda *vs: _stack(vs), *states, is_leaf=_is_var)


def layer_slice(state: nnx.State, index: Any = None) -> nnx.State:
  """Inverse of :func:`stack_states` for one layer: ``index`` selects it (None: the leading axis is already gone,
  as inside ``lax.scan``); the 'layers' name is dropped from the metadata."""
  return jax.tree.map(lambda v: _take(v, index), state, is_leaf=_is_var)


def checkpointed(apply: Callable, remat: str) -> Callable:
  """``apply(state, carry)`` under ``jax.checkpoint`` with the REMAT_POLICIES entry ('none': unchanged)."""
  return apply if remat == "none" else jax.checkpoint(apply, policy=REMAT_POLICIES[remat])


def apply_block(block: nnx.Module, fn: Callable, carry: Any, remat: str = "none") -> Any:
  """``fn(block, carry)``, rematerialised with the ``remat`` policy."""
  graphdef, state = nnx.split(block)
  return checkpointed(lambda s, c: fn(nnx.merge(graphdef, s), c), remat)(state, carry)


class Stacked(nnx.Module):
  """``length`` modules of one structure stored as one ``layer`` whose variables carry a leading (length,) axis
  (logical name 'layers'), applied by ``lax.scan``: one compiled layer and no per-step copy of the weights.
  Built from per-layer modules, so its values are exactly theirs."""

  def __init__(self, modules: Sequence[nnx.Module]):
    splits = [nnx.split(m) for m in modules]
    if any(g != splits[0][0] for g, _ in splits):
      raise ValueError("Stacked needs modules of one structure")
    self.length = len(modules)
    self.layer = nnx.merge(splits[0][0], stack_states([s for _, s in splits]))

  def scan(self, fn: Callable, carry: Any, *, remat: str = "none", skip: Sequence[int] = ()) -> Any:
    """carry = fn(layer i, carry) for i = 0 .. length-1 in one ``lax.scan``; layers in ``skip`` (indices in the
    stack) pass the carry through unchanged (``lax.cond``). Each layer is rematerialised with ``remat``."""
    graphdef, state = nnx.split(self.layer)
    apply = checkpointed(lambda s, c: fn(nnx.merge(graphdef, layer_slice(s)), c), remat)
    if not skip:
      return jax.lax.scan(lambda c, s: (apply(s, c), None), carry, state)[0]
    skipped = np.isin(np.arange(self.length), np.asarray(skip, int))

    def body(c, xs):
      s, off = xs
      return jax.lax.cond(off, lambda: c, lambda: apply(s, c)), None

    return jax.lax.scan(body, carry, (state, skipped))[0]


def run_lengths(keys: Sequence) -> tuple[int, ...]:
  """Lengths of the runs of equal consecutive keys: (a, a, b, c, c) -> (2, 1, 2)."""
  lengths: list[int] = []
  for i, key in enumerate(keys):
    if i and key == keys[i - 1]:
      lengths[-1] += 1
    else:
      lengths.append(1)
  return tuple(lengths)


def stack_runs(blocks: Sequence[nnx.Module], lengths: Sequence[int]) -> nnx.List:
  """Blocks -> one entry per run: a :class:`Stacked` of the run, or the block itself for a run of one."""
  starts = np.cumsum((0, *lengths))
  return nnx.List([Stacked(blocks[a:b]) if b - a > 1 else blocks[a] for a, b in zip(starts[:-1], starts[1:])])


def run_blocks(runs: Sequence[nnx.Module], fn: Callable, carry: Any, *, remat: str = "none",
               skip: Sequence[int] = ()) -> Any:
  """carry = fn(block, carry) over every block (by global index, leaving out ``skip``) of a list of plain blocks
  and :class:`Stacked` runs, each block rematerialised with ``remat``."""
  start = 0
  for run in runs:
    n = run.length if isinstance(run, Stacked) else 1
    local = tuple(i - start for i in skip if start <= i < start + n)
    if len(local) < n:
      if isinstance(run, Stacked):
        carry = run.scan(fn, carry, remat=remat, skip=local)
      else:
        carry = apply_block(run, fn, carry, remat)
    start += n
  return carry


def stack_blocks(state: nnx.State, name: str, lengths: Sequence[int]) -> nnx.State:
  """A per-block state (``state[name][i]`` for block i) -> the stacked layout of :func:`stack_runs` with run
  ``lengths`` (``state[name][r]``: ``{'layer': stacked}`` for a run, the block's state for a run of one)."""
  blocks: dict[int, dict[tuple, nnx.Variable]] = {}
  out = []
  for path, var in nnx.to_flat_state(state):
    if path[0] == name:
      blocks.setdefault(path[1], {})[path[2:]] = var
    else:
      out.append((path, var))
  starts = np.cumsum((0, *lengths)).tolist()
  for r, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
    for rest, var in blocks[a].items():
      stacked = var if b - a == 1 else _stack([blocks[i][rest] for i in range(a, b)])
      out.append(((name, r, *rest) if b - a == 1 else (name, r, "layer", *rest), stacked))
  return nnx.from_flat_state(out)


def unstack_blocks(state: nnx.State, name: str, lengths: Sequence[int]) -> nnx.State:
  """Inverse of :func:`stack_blocks`: the canonical per-block layout."""
  starts = np.cumsum((0, *lengths)).tolist()
  out = []
  for path, var in nnx.to_flat_state(state):
    if path[0] != name:
      out.append((path, var))
    elif lengths[path[1]] == 1:
      out.append(((name, starts[path[1]], *path[2:]), var))
    else:
      out += [((name, starts[path[1]] + j, *path[3:]), _take(var, j)) for j in range(lengths[path[1]])]
  return nnx.from_flat_state(out)
