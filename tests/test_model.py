"""DiT model: named configs, initialisation, embeddings against diffusers' functions, dtypes, call convention."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dit_jax.models import layers
from dit_jax.models.dit import CONFIGS, DiT, DiTConfig, count_params, dit_config
from dit_jax.models.layers import unpatchify

# Parameter counts of facebookresearch/DiT at 256 px, pos_embed included (dit-reference.md §1.6).
PAPER_PARAMS = {"DiT-S/2": 32_963_360, "DiT-B/2": 130_512_416, "DiT-L/2": 458_102_816, "DiT-XL/2": 675_129_632}


def _abstract(cfg: DiTConfig) -> DiT:
  return nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))


def test_twelve_named_configs_and_param_counts():
  assert len(CONFIGS) == 12
  for name in CONFIGS:
    n = count_params(_abstract(dit_config(name)))
    if name in PAPER_PARAMS:
      assert n == PAPER_PARAMS[name], name
  assert dit_config("DiT-XL-2") == dit_config("DiT-XL/2")
  assert count_params(_abstract(dit_config("DiT-XL/2", input_size=64))) == 676_014_368


@pytest.mark.parametrize("bad", [dict(input_size=30, patch_size=4), dict(num_heads=5), dict(class_dropout_prob=1.5),
                                 dict(hidden_size=6, num_heads=3)])
def test_bad_config_values_are_rejected(bad):
  with pytest.raises(ValueError, match="invalid DiT config"):
    DiTConfig(**{**dict(hidden_size=64, num_heads=4), **bad})
  with pytest.raises(ValueError, match="unknown DiT model"):
    dit_config("DiT-XXL/2")


def test_init_matches_original_scheme():
  cfg = dit_config("DiT-S/4", input_size=16)
  model = DiT(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 4))
  out = model(x, jnp.array([3.0, 999.0]), jnp.array([5, cfg.null_class]))
  assert out.shape == (2, 16, 16, 8) and not jnp.any(out), "adaLN-Zero: output must be exactly 0 at init"
  c, p, d = cfg.in_channels, cfg.patch_size, cfg.hidden_size
  kernel = model.x_embedder.proj.kernel[...]
  bound = math.sqrt(6 / (c * p * p + d))  # xavier on the flattened (D, C*p*p) conv weight
  assert kernel.shape == (p * p * c, d) and 0.9 * bound < float(jnp.abs(kernel).max()) <= bound
  qkv = model.blocks[0].attn.qkv.kernel[...]
  assert float(jnp.abs(qkv).max()) <= math.sqrt(6 / (d + 3 * d))
  for table in (model.y_embedder.embedding_table.embedding[...], model.t_embedder.fc1.kernel[...]):
    assert abs(float(table.std()) - 0.02) < 0.002
  assert model.y_embedder.embedding_table.embedding.shape[0] == cfg.num_classes + 1
  for zeroed in (model.blocks[0].adaLN_modulation, model.final_layer.adaLN_modulation, model.final_layer.linear):
    assert not jnp.any(zeroed.kernel[...]) and not jnp.any(zeroed.bias[...])
  assert model.blocks[0].mlp.fc1.kernel.shape == (d, 4 * d)


@pytest.mark.parametrize("shift", [0, 1])
def test_timestep_embedding_matches_diffusers(shift):
  """shift 0 is the original DiT formula; diffusers' own function with flip_sin_to_cos gives [cos, sin]."""
  from diffusers.models.embeddings import get_timestep_embedding

  t = np.array([0, 1, 17, 250.5, 999], np.float32)
  ref = get_timestep_embedding(torch.from_numpy(t), 256, flip_sin_to_cos=True, downscale_freq_shift=shift).numpy()
  ours = np.asarray(layers.timestep_embedding(jnp.asarray(t), 256, freq_shift=shift))
  # t * freq at t=999 has an ulp of 6e-5; torch.exp itself is within 1 ulp of the exact frequency.
  assert np.abs(ours - ref).max() < 1.2e-4
  assert np.abs(ours[:3] - ref[:3]).max() < 1e-6


@pytest.mark.parametrize("dim,h,w", [(64, 4, 4), (1152, 16, 16), (96, 6, 6)])
def test_sincos_table_matches_diffusers(dim, h, w):
  from diffusers.models.embeddings import get_2d_sincos_pos_embed

  ref = get_2d_sincos_pos_embed(dim, (h, w), base_size=h).float().numpy()
  np.testing.assert_array_equal(layers.sincos_2d(dim, h, w), ref)


def test_layer_norm_matches_torch():
  x = np.random.default_rng(0).standard_normal((2, 5, 48)).astype(np.float32) * 3 + 1
  for eps in (1e-6, 1e-5):
    ref = torch.nn.functional.layer_norm(torch.from_numpy(x), (48,), eps=eps).numpy()
    np.testing.assert_allclose(np.asarray(layers.layer_norm(jnp.asarray(x), eps)), ref, atol=2e-6)


def test_patchify_and_unpatchify_are_inverse():
  x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
  p = 4
  tokens = x.reshape(2, 2, p, 2, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, p * p * 3)
  np.testing.assert_array_equal(unpatchify(tokens, p, 3, 2, 2), x)


def _random_small(dtype=jnp.float32, **kw):
  cfg = DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10, **kw)
  model = DiT(cfg, rngs=nnx.Rngs(0), dtype=dtype)
  graphdef, state = nnx.split(model)
  keys = iter(jax.random.split(jax.random.key(7), 1000))
  state = jax.tree.map(lambda a: 0.1 * jax.random.normal(next(keys), a.shape, a.dtype), state)
  return nnx.merge(graphdef, state)


def test_bf16_compute_with_fp32_params():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  t, y = jnp.array([10.0, 900.0]), jnp.array([1, 10])
  ref = _random_small()(x, t, y)
  model = _random_small(jnp.bfloat16)
  out = model(x, t, y)
  assert out.dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model)))
  err = float(jnp.abs(out.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
  assert 0 < err < 5e-2, err


def test_label_dropout_and_null_class():
  model = _random_small()
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 4))
  t, y = jnp.full((4,), 500.0), jnp.array([0, 1, 2, 3])
  null = model(x, t, jnp.full((4,), 10))
  forced = model(x, t, y, force_drop_ids=jnp.array([1, 1, 1, 1]))
  np.testing.assert_array_equal(forced, null)
  assert not np.array_equal(model(x, t, y), null)
  dropped = model.y_embedder.token_drop(jnp.zeros(20000, jnp.int32), jax.random.key(3), None)
  assert abs(float((dropped == 10).mean()) - 0.1) < 0.01
  np.testing.assert_array_equal(model(x, t, y, dropout_key=None), model(x, t, y))


def test_wrong_input_shape_is_one_line_error():
  model = _random_small()
  with pytest.raises(ValueError, match=r"expects input \(B, 8, 8, 4\) NHWC, got \(1, 4, 8, 8\)"):
    model(jnp.zeros((1, 4, 8, 8)), jnp.zeros(1), jnp.zeros(1, jnp.int32))


def test_jit_matches_eager():
  model = _random_small()
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  t, y = jnp.array([10.0, 900.0]), jnp.array([1, 10])
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, x, t, y)
  np.testing.assert_allclose(jitted, model(x, t, y), rtol=1e-5, atol=1e-5)
