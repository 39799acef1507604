"""MMDiT (SD3 / SD3.5) parity with diffusers' SD3Transformer2DModel and strict diffusers-layout conversion."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dit_jax.convert import mmdit_tables
from dit_jax.convert.readers import ConversionError, read_source
from dit_jax.models.mmdit import MMDiT, MMDiTConfig, crop_pos_embed, pos_embed_table
from tests.helpers import rel_err
from tests.helpers.reference import SD3_TINY as TINY
from tests.helpers.reference import SD3_VARIANTS as VARIANTS
from tests.helpers.reference import diffusers_sd3, sd3_forward, stability_state_dict

SHAPES = [(16, 16), (12, 20)]  # square at sample_size, and non-square (crop offsets differ per axis)


def sd3_inputs(height: int, width: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, height, width, TINY["in_channels"])).astype(np.float32)
  t = np.array([3.0, 750.5], np.float32)  # sigma * 1000
  context = rng.standard_normal((2, 7, TINY["joint_attention_dim"])).astype(np.float32)
  pooled = rng.standard_normal((2, TINY["pooled_projection_dim"])).astype(np.float32)
  return x, t, context, pooled


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """variant -> (diffusers model, source tensors, converted MMDiT), via save_pretrained -> read_source."""
  out = {}
  for i, (name, kw) in enumerate(VARIANTS.items()):
    model = diffusers_sd3(seed=i, **kw)
    folder = tmp_path_factory.mktemp(name.replace(".", "_"))
    model.save_pretrained(folder)
    source = read_source(folder)
    layout = mmdit_tables.detect_layout(source.tensors)
    cfg = mmdit_tables.infer_config(source.tensors, layout, source.diffusers_config)
    out[name] = (model, source.tensors, mmdit_tables.to_model(source.tensors, cfg, layout))
  return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_infer_config(converted, variant):
  cfg = converted[variant][2].config
  assert cfg == MMDiTConfig(**TINY, **VARIANTS[variant])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_forward_parity(converted, variant, shape):
  model, _, ours = converted[variant]
  x, t, context, pooled = sd3_inputs(*shape)
  ref = sd3_forward(model, x, t, context, pooled)
  out = ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(context), jnp.asarray(pooled))
  assert out.shape == ref.shape == (2, *shape, TINY["out_channels"])
  assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_is_exact_inverse(converted, variant):
  _, tensors, ours = converted[variant]
  back = mmdit_tables.from_model(ours, "diffusers")
  assert set(back) == set(tensors)
  for key, value in tensors.items():
    assert back[key].shape == value.shape and np.array_equal(back[key], value), key


def test_skip_layers_matches_diffusers(converted):
  model, _, ours = converted["sd3.5-medium"]
  x, t, context, pooled = sd3_inputs(12, 20)
  with torch.no_grad():
    ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(context),
                torch.from_numpy(pooled), torch.from_numpy(t), skip_layers=[1]).sample.numpy().transpose(0, 2, 3, 1)
  assert rel_err(ours(x, t, context, pooled, skip_layers=(1,)), ref) <= 1e-5


def _one_line_error(tensors, cfg) -> str:
  with pytest.raises(ConversionError) as info:
    mmdit_tables.to_model(tensors, cfg, "diffusers")
  message = str(info.value)
  assert "\n" not in message
  return message


def test_strict_conversion(converted):
  _, tensors, ours = converted["sd3.5-medium"]
  cfg = ours.config
  missing = dict(tensors)
  del missing["transformer_blocks.1.attn2.norm_k.weight"]
  assert "missing keys: transformer_blocks.1.attn2.norm_k.weight" in _one_line_error(missing, cfg)
  extra = {**tensors, "transformer_blocks.2.attn.to_add_out.weight": np.zeros((32, 32), np.float32)}
  assert "unexpected keys: transformer_blocks.2.attn.to_add_out.weight" in _one_line_error(extra, cfg)
  wrong = {**tensors, "proj_out.bias": np.zeros((15,), np.float32)}
  assert "wrong shape: proj_out.bias (15,), expected (16,)" in _one_line_error(wrong, cfg)
  # a config that disagrees with the weights (no dual attention) leaves the attn2 keys unexpected
  message = _one_line_error(tensors, dataclasses.replace(cfg, dual_attention_layers=()))
  assert "unexpected keys: transformer_blocks.0.attn2" in message


def test_infer_config_errors(converted):
  _, tensors, _ = converted["sd3-medium"]
  with pytest.raises(ConversionError, match="missing key pos_embed.pos_embed"):
    mmdit_tables.infer_config({k: v for k, v in tensors.items() if k != "pos_embed.pos_embed"}, "diffusers")
  gap = {k: v for k, v in tensors.items() if not k.startswith("transformer_blocks.1.")}
  with pytest.raises(ConversionError, match=r"missing keys for transformer_blocks\.1"):
    mmdit_tables.infer_config(gap, "diffusers")


def test_initial_table_and_crop():
  from diffusers import SD3Transformer2DModel

  ref = SD3Transformer2DModel(**TINY).pos_embed.pos_embed[0].numpy()
  ours = pos_embed_table(32, TINY["pos_embed_max_size"], TINY["sample_size"] // TINY["patch_size"])
  np.testing.assert_allclose(ours, ref, atol=1e-6)
  table = jnp.arange(24 * 24, dtype=jnp.float32)[:, None]
  crop = crop_pos_embed(table, 24, 6, 10).reshape(6, 10)
  assert crop[0, 0] == 9 * 24 + 7 and crop[-1, -1] == 14 * 24 + 16
  with pytest.raises(ValueError, match="exceeds pos_embed_max_size"):
    crop_pos_embed(table, 24, 25, 4)


def test_fresh_model_runs_and_config_round_trips():
  cfg = MMDiTConfig(**TINY, qk_norm="rms_norm", dual_attention_layers=(0,))
  assert MMDiTConfig.from_dict(cfg.to_dict()) == cfg
  from flax import nnx
  model = MMDiT(cfg, rngs=nnx.Rngs(0))
  x, t, context, pooled = sd3_inputs(8, 14)
  out = model(x, t, context, pooled)
  assert out.shape == (2, 8, 14, 4) and np.all(np.isfinite(np.asarray(out)))
  with pytest.raises(ValueError, match="caption_projection_dim"):
    MMDiTConfig(**{**TINY, "caption_projection_dim": 48})


@pytest.mark.parametrize("variant", VARIANTS)
def test_stability_layout(converted, variant):
  model, tensors, ours = converted[variant]
  stab = stability_state_dict(tensors, ours.config.num_layers)
  stab["first_stage_model.decoder.conv_in.weight"] = np.zeros((1,), np.float32)  # other parts of a single file
  cfg = mmdit_tables.infer_config(stab, "stability", None, sample_size=TINY["sample_size"], num_attention_heads=2)
  assert cfg == ours.config
  model_s = mmdit_tables.to_model(stab, cfg, "stability")
  x, t, context, pooled = sd3_inputs(12, 20)
  assert rel_err(model_s(x, t, context, pooled), sd3_forward(model, x, t, context, pooled)) <= 1e-5
  back = mmdit_tables.from_model(model_s, "stability")
  assert all(np.array_equal(back[k[len("model.diffusion_model."):]], v) for k, v in stab.items()
             if k.startswith("model."))
  assert len(back) == len(stab) - 1


def test_stability_head_split_needs_a_hint(converted):
  _, tensors, ours = converted["sd3-medium"]
  stab = stability_state_dict(tensors, ours.config.num_layers)
  with pytest.raises(ConversionError, match="cannot split hidden size 32 into heads of width 10"):
    mmdit_tables.infer_config(stab, "stability")  # Stability's rule heads = depth = 3 does not divide 32


def test_remat_and_scan_change_nothing():
  """Rematerialised and scanned blocks (runs of dual-attention / plain / pre-only blocks, also with skipped blocks
  inside a stacked run or a whole run skipped) give the plain forward and gradients."""
  import jax
  from flax import nnx

  from dit_jax.models.mmdit import stack_blocks, unstack_blocks

  cfg = MMDiTConfig(**{**TINY, "num_layers": 5}, qk_norm="rms_norm", dual_attention_layers=(0, 1))
  graphdef, state = nnx.split(MMDiT(cfg, rngs=nnx.Rngs(0)))
  scanned = nnx.graphdef(nnx.eval_shape(lambda: MMDiT(cfg, rngs=nnx.Rngs(0), scan_layers=True)))
  state = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(jax.random.key(v.size), v.shape), state)  # no zeros
  x, t, context, pooled = sd3_inputs(12, 20)
  flat = lambda tree: np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])

  def loss(state, remat, scan, skip):
    model = nnx.merge(scanned if scan else graphdef, state)  # scanned: blocks stored stacked per run
    model.remat = remat
    return jnp.sum(model(x, t, context, pooled, skip_layers=skip) ** 2)

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2, 3))
  for remat, skip in (("full", ()), ("dots", (2,)), ("none", (1, 2, 3))):
    want, want_grads = grad(state, "none", False, skip)
    got, grads = grad(stack_blocks(state, cfg), remat, True, skip)
    grads = unstack_blocks(grads, cfg)
    err = rel_err(flat(grads), flat(want_grads))
    assert abs(got - want) <= 1e-6 * abs(want) and err <= 1e-5, f"loss {got} vs {want}, grads rel err {err:.1e}"
