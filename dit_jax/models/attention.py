"""Multi-head scaled dot-product attention shared by every model (DiT, MMDiT).

One entry point, :func:`dot_product_attention`, with an implementation switch:

* ``"cudnn"``  cuDNN fused flash attention (GPU, bf16/fp16, head dim a multiple of 8, <=256 on Hopper, <=128 before).
* ``"splash"`` Pallas splash attention (TPU).
* ``"xla"``    the portable XLA lowering (materialises the T x S score matrix).
* ``"auto"``   the fastest of the above that supports the call, else XLA.

The choice follows the devices the computation targets: the mesh set by ``jax.set_mesh`` (so a compile for a TPU
topology on a CPU host picks what the TPU runs), else the default backend. Under a mesh the fused kernels run in
``jax.shard_map`` over the batch and head axes: GSPMD does not partition Pallas kernels, and cuDNN cannot be split
over the sequence. Splash needs sequence lengths in multiples of 128: other lengths (the MMDiT's 77 + 256 + 4096
joint tokens) are padded, the padding masked out of every softmax by segment ids.

An explicit choice that cannot run the call falls back to XLA and logs the reason once.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

logger = logging.getLogger("dit_jax")

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
SPLASH_ALIGN = 128  # splash block granularity; sequences are padded to a multiple of it
HEAD_AXIS = "tensor"  # the mesh axis heads are split over (dit_jax.parallel's 'heads' rule)


@functools.lru_cache(maxsize=None)
def _log_fallback(requested: str, reason: str) -> None:
  logger.warning("attention: %r unavailable (%s); using XLA", requested, reason)


def _mesh() -> jax.sharding.AbstractMesh | None:
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def target_platform() -> str:
  """'tpu', 'gpu' or 'cpu': the platform of the current mesh's devices, else of the default backend."""
  mesh = _mesh()
  return mesh.abstract_device.platform if mesh is not None else jax.default_backend()


def _cudnn_unsupported(q: jax.Array) -> str | None:
  """Why cuDNN flash attention cannot run this call, or None if it can."""
  platform = target_platform()
  if platform != "gpu":
    return f"target platform is {platform}, not gpu"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {q.dtype} (cuDNN needs bf16 or fp16)"
  head_dim = q.shape[-1]
  if head_dim % 8:
    return f"head dim {head_dim} is not a multiple of 8"
  cc = getattr(jax.devices()[0], "compute_capability", "0")
  limit = 256 if float(cc) >= 9.0 else 128
  if head_dim > limit:
    return f"head dim {head_dim} > {limit} on compute capability {cc}"
  return None


def _splash_unsupported(q: jax.Array) -> str | None:
  platform = target_platform()
  return None if platform == "tpu" else f"target platform is {platform}, not tpu"


def choose_implementation(q: jax.Array, k: jax.Array, requested: str = "auto") -> str:
  """The implementation that will run for these inputs ('xla', 'cudnn' or 'splash')."""
  del k  # every kernel here takes any key length (splash through padding)
  if requested not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {requested!r} is not one of {IMPLEMENTATIONS}")
  if requested == "xla":
    return "xla"
  candidates = ("cudnn", "splash") if requested == "auto" else (requested,)
  checks = {"cudnn": lambda: _cudnn_unsupported(q), "splash": lambda: _splash_unsupported(q)}
  reasons = []
  for name in candidates:
    reason = checks[name]()
    if reason is None:
      return name
    reasons.append(f"{name}: {reason}")
  if requested != "auto":
    _log_fallback(requested, "; ".join(reasons))
  return "xla"


def _block(length: int) -> int:
  return next(b for b in (512, 256, SPLASH_ALIGN) if length % b == 0)


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, interpret: bool = False) -> jax.Array:
  """Pallas splash attention on one shard; inputs (B, T, H, D), full (non-causal) mask.

  Lengths that are not multiples of 128 are zero-padded; segment ids (0 real, 1 padding) keep real queries off
  padded keys, and the padded query rows are dropped. ``interpret`` runs the kernel in Pallas' interpreter (any
  backend; for tests).
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  _, t_q, heads, _ = q.shape
  t_kv = k.shape[1]
  pad_q, pad_kv = -t_q % SPLASH_ALIGN, -t_kv % SPLASH_ALIGN
  pad = lambda a, n: jnp.pad(a, ((0, 0), (0, n), (0, 0), (0, 0))) if n else a
  q, k, v = pad(q * scale, pad_q), pad(k, pad_kv), pad(v, pad_kv)
  lq, lkv = t_q + pad_q, t_kv + pad_kv
  bq, bkv = _block(lq), _block(lkv)
  sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                        block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
  mask = sa.MultiHeadMask([sa.FullMask((lq, lkv)) for _ in range(heads)])
  kernel = sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
  to_hnd = lambda a: jnp.swapaxes(a, 1, 2)  # (B, H, T, D)
  if pad_q or pad_kv:
    segments = sa.SegmentIds(q=(jnp.arange(lq) >= t_q).astype(jnp.int32),
                             kv=(jnp.arange(lkv) >= t_kv).astype(jnp.int32))
    out = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(to_hnd(q), to_hnd(k), to_hnd(v))
  else:
    out = jax.vmap(kernel)(to_hnd(q), to_hnd(k), to_hnd(v))
  return jnp.swapaxes(out, 1, 2)[:, :t_q]


def _cudnn(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
  return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")


def shard_spec(mesh: jax.sharding.AbstractMesh, batch: int, heads: int) -> P:
  """(B, T, H, D) spec of a fused-attention shard: the batch over every mesh axis but the head axis that divides
  it (in mesh order), the heads over ``HEAD_AXIS`` when it divides them; sequence and head dim whole."""
  batch_axes, size = [], 1
  for name in mesh.axis_names:
    n = mesh.shape[name]
    if name != HEAD_AXIS and n > 1 and batch % (size * n) == 0:
      batch_axes.append(name)
      size *= n
  head = HEAD_AXIS if mesh.shape.get(HEAD_AXIS, 1) > 1 and heads % mesh.shape[HEAD_AXIS] == 0 else None
  return P(tuple(batch_axes) or None, None, head, None)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str = "auto") -> jax.Array:
  """softmax(q k^T / sqrt(d)) v.

  Args:
    q: (B, T, H, D) queries; k, v: (B, S, H, D).
    implementation: one of ``IMPLEMENTATIONS``.
  Returns:
    (B, T, H, D) in q's dtype.
  """
  scale = q.shape[-1] ** -0.5
  impl = choose_implementation(q, k, implementation)
  if impl == "xla":
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
  kernel = functools.partial(_splash if impl == "splash" else _cudnn, scale=scale)
  mesh = _mesh()
  if mesh is None:
    return kernel(q, k, v)
  spec = shard_spec(mesh, q.shape[0], q.shape[2])
  return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)
