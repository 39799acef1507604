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
