"""The shared attention function against torch's scaled_dot_product_attention, and its implementation switch."""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dit_jax.models import attention


def _qkv(b=2, t=12, s=12, h=3, d=16, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 3)
  return [jax.random.normal(k, (b, n, h, d), dtype) for k, n in zip(keys, (t, s, s))]


def test_matches_torch_sdpa():
  q, k, v = _qkv(t=10, s=14)
  ours = attention.dot_product_attention(q, k, v, implementation="xla")
  to_t = lambda a: torch.from_numpy(np.array(a)).transpose(1, 2)  # (B, H, T, D)
  ref = torch.nn.functional.scaled_dot_product_attention(to_t(q), to_t(k), to_t(v)).transpose(1, 2).numpy()
  np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("requested", ["cudnn", "splash"])
def test_unavailable_choice_falls_back_to_xla_with_reason(requested, caplog):
  if jax.default_backend() != "cpu":
    pytest.skip("fallback is exercised on CPU")
  attention._log_fallback.cache_clear()
  q, k, v = _qkv()
  with caplog.at_level(logging.WARNING, logger="dit_jax"):
    out = attention.dot_product_attention(q, k, v, implementation=requested)
  assert attention.choose_implementation(q, k, requested) == "xla"
  assert any(requested in r.message and "not" in r.message for r in caplog.records), caplog.text
  np.testing.assert_array_equal(out, attention.dot_product_attention(q, k, v, implementation="xla"))


def test_auto_is_silent_and_unknown_choice_raises(caplog):
  q, k, v = _qkv()
  with caplog.at_level(logging.WARNING, logger="dit_jax"):
    attention.dot_product_attention(q, k, v)
  assert not caplog.records
  with pytest.raises(ValueError, match="not one of"):
    attention.dot_product_attention(q, k, v, implementation="flash")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_cudnn_matches_xla_on_gpu():
  q, k, v = _qkv(t=256, s=256, h=4, d=64, dtype=jnp.bfloat16)
  assert attention.choose_implementation(q, k, "auto") == "cudnn"
  fast = attention.dot_product_attention(q, k, v, implementation="cudnn").astype(jnp.float32)
  ref = attention.dot_product_attention(q, k, v, implementation="xla").astype(jnp.float32)
  assert float(jnp.abs(fast - ref).max()) < 2e-2


# ---------------------------------------------------------------------------------------------------------------
# splash (Pallas' interpreter on this CPU) and its sharding


def test_splash_pads_and_masks_to_match_torch_sdpa():
  """Lengths that are not multiples of 128 (the MMDiT's joint sequence) run padded, the padding masked out by segment
  ids: the output and the gradients equal torch's SDPA / XLA attention."""
  q, k, v = _qkv(b=1, t=100, s=150, h=2, d=32)
  ours = attention._splash(q, k, v, 32**-0.5, interpret=True)
  to_t = lambda a: torch.from_numpy(np.array(a)).transpose(1, 2)
  ref = torch.nn.functional.scaled_dot_product_attention(to_t(q), to_t(k), to_t(v)).transpose(1, 2).numpy()
  err = float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())
  assert ours.shape == ref.shape and err <= 1e-5, f"splash vs torch SDPA: rel err {err:.1e}"
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
  splash = jax.grad(loss(lambda q, k, v: attention._splash(q, k, v, 32**-0.5, interpret=True)), (0, 1, 2))(q, k, v)
  xla = jax.grad(loss(lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="xla")), (0, 1, 2))(
      q, k, v)
  for name, a, b in zip("qkv", splash, xla):
    err = float(jnp.abs(a - b).max() / jnp.abs(b).max())
    assert err <= 1e-5, f"d{name}: splash vs XLA rel err {err:.1e}"


def test_shard_spec_splits_batch_and_heads_where_they_divide():
  mesh = jax.sharding.AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
  P = jax.sharding.PartitionSpec
  assert attention.shard_spec(mesh, batch=8, heads=4) == P(("data", "fsdp"), None, "tensor", None)
  assert attention.shard_spec(mesh, batch=2, heads=3) == P(("data",), None, None, None)
  assert attention.shard_spec(mesh, batch=1, heads=2) == P(None, None, "tensor", None)


def test_choice_follows_the_mesh_devices_not_the_host():
  """Under a mesh of TPU devices (here abstract, as a compile for a TPU topology sees them) 'auto' picks splash
  although the host is a CPU; without a mesh it picks for the host."""
  q, k, _ = _qkv()
  tpu_mesh = jax.sharding.AbstractMesh((1,), ("data",), abstract_device=_abstract_device("tpu"))
  with jax.sharding.use_abstract_mesh(tpu_mesh):
    assert attention.choose_implementation(q, k, "auto") == "splash"
  assert attention.choose_implementation(q, k, "auto") == ("cudnn" if jax.default_backend() == "gpu" else "xla")


def _abstract_device(platform: str):
  from jax._src.mesh import AbstractDevice

  return AbstractDevice(device_kind="TPU v5 lite", num_cores=None, platform=platform)
