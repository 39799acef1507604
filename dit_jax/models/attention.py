"""Multi-head scaled dot-product attention shared by every model (DiT, MMDiT).

One entry point, :func:`dot_product_attention`, with an implementation switch:

* ``"cudnn"``  cuDNN fused flash attention (GPU, bf16/fp16, head dim a multiple of 8, <=256 on Hopper, <=128 before).
* ``"splash"`` Pallas splash attention (TPU; sequence length a multiple of 128).
* ``"xla"``    the portable XLA lowering (materialises the T x S score matrix).
* ``"auto"``   the fastest of the above that supports the call, else XLA.

An explicit choice that cannot run the call falls back to XLA and logs the reason once.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

logger = logging.getLogger("dit_jax")

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")


@functools.lru_cache(maxsize=None)
def _log_fallback(requested: str, reason: str) -> None:
  logger.warning("attention: %r unavailable (%s); using XLA", requested, reason)


def _platform() -> str:
  return jax.default_backend()


def _cudnn_unsupported(q: jax.Array) -> str | None:
  """Why cuDNN flash attention cannot run this call, or None if it can."""
  if _platform() != "gpu":
    return f"backend is {_platform()}, not gpu"
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


def _splash_unsupported(q: jax.Array, k: jax.Array) -> str | None:
  if _platform() != "tpu":
    return f"backend is {_platform()}, not tpu"
  if q.shape[1] % 128 or k.shape[1] % 128:
    return f"sequence lengths {q.shape[1]}/{k.shape[1]} are not multiples of 128"
  return None


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
  """Pallas splash attention; inputs (B, T, H, D), full (non-causal) mask."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  _, t_q, heads, _ = q.shape
  t_kv = k.shape[1]
  mask = sa.MultiHeadMask([sa.FullMask((t_q, t_kv)) for _ in range(heads)])
  kernel = sa.make_splash_mha(mask, head_shards=1, q_seq_shards=1)
  to_hnd = lambda a: jnp.swapaxes(a, 1, 2)  # (B, H, T, D)
  out = jax.vmap(kernel)(to_hnd(q * scale), to_hnd(k), to_hnd(v))
  return jnp.swapaxes(out, 1, 2)


def choose_implementation(q: jax.Array, k: jax.Array, requested: str = "auto") -> str:
  """The implementation that will run for these inputs ('xla', 'cudnn' or 'splash')."""
  if requested not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {requested!r} is not one of {IMPLEMENTATIONS}")
  if requested == "xla":
    return "xla"
  candidates = ("cudnn", "splash") if requested == "auto" else (requested,)
  checks = {"cudnn": lambda: _cudnn_unsupported(q), "splash": lambda: _splash_unsupported(q, k)}
  reasons = []
  for name in candidates:
    reason = checks[name]()
    if reason is None:
      return name
    reasons.append(f"{name}: {reason}")
  if requested != "auto":
    _log_fallback(requested, "; ".join(reasons))
  return "xla"


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
  if impl == "splash":
    return _splash(q, k, v, scale)
  return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)
