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
from tests.conftest import randomize_, rel_err

TINY = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=20, out_channels=4,
            pos_embed_max_size=24)
# Tiny configs shaped like the released models (diffusers transformer/config.json).
VARIANTS = {
    "sd3-medium": dict(qk_norm=None, dual_attention_layers=()),
    "sd3.5-medium": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)),
    "sd3.5-large": dict(qk_norm="rms_norm", dual_attention_layers=()),
}
SHAPES = [(16, 16), (12, 20)]  # square at sample_size, and non-square (crop offsets differ per axis)


def diffusers_sd3(seed: int = 0, **kw):
  """A random-weight SD3Transformer2DModel in eval mode; the stored pos_embed buffer is random too, so a wrong
  crop offset cannot hide behind the smoothness of the sin-cos table."""
  from diffusers import SD3Transformer2DModel

  model = SD3Transformer2DModel(**{**TINY, **kw})
  randomize_(model, seed)
  with torch.no_grad():
    model.pos_embed.pos_embed.copy_(torch.randn(model.pos_embed.pos_embed.shape,
                                                generator=torch.Generator().manual_seed(seed + 1)))
  return model.eval()


def sd3_inputs(height: int, width: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, height, width, TINY["in_channels"])).astype(np.float32)
  t = np.array([3.0, 750.5], np.float32)  # sigma * 1000
  context = rng.standard_normal((2, 7, TINY["joint_attention_dim"])).astype(np.float32)
  pooled = rng.standard_normal((2, TINY["pooled_projection_dim"])).astype(np.float32)
  return x, t, context, pooled


def torch_forward(model, x, t, context, pooled) -> np.ndarray:
  with torch.no_grad():
    out = model(hidden_states=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                encoder_hidden_states=torch.from_numpy(context), pooled_projections=torch.from_numpy(pooled),
                timestep=torch.from_numpy(t)).sample
  return out.numpy().transpose(0, 2, 3, 1)


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
  ref = torch_forward(model, x, t, context, pooled)
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


def stability_state_dict(tensors: dict[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
  """Stability single-file keys (``model.diffusion_model.*``) from diffusers keys, written out from the mapping
  in diffusers' scripts/convert_sd3_to_diffusers.py independently of dit_jax's tables: fused qkv, and the
  (scale, shift) halves of AdaLayerNormContinuous swapped back to (shift, scale)."""
  swap = lambda a: np.concatenate(np.split(a, 2)[::-1])
  renames = {"pos_embed.proj": "x_embedder.proj", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
             "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
             "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "context_embedder": "context_embedder",
             "proj_out": "final_layer.linear"}
  out = {"pos_embed": tensors["pos_embed.pos_embed"]}
  for kind in ("weight", "bias"):
    for theirs, ours in renames.items():
      out[f"{ours}.{kind}"] = tensors[f"{theirs}.{kind}"]
    out[f"final_layer.adaLN_modulation.1.{kind}"] = swap(tensors[f"norm_out.linear.{kind}"])
  block_map = {"norm1.linear": "x_block.adaLN_modulation.1", "attn.to_out.0": "x_block.attn.proj",
               "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
               "attn2.to_out.0": "x_block.attn2.proj", "norm1_context.linear": "context_block.adaLN_modulation.1",
               "attn.to_add_out": "context_block.attn.proj", "ff_context.net.0.proj": "context_block.mlp.fc1",
               "ff_context.net.2": "context_block.mlp.fc2"}
  norm_map = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
              "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
              "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k"}
  for i in range(num_layers):
    tb, jb = f"transformer_blocks.{i}", f"joint_blocks.{i}"
    for kind in ("weight", "bias"):
      for theirs, ours in block_map.items():
        if f"{tb}.{theirs}.{kind}" in tensors:
          value = tensors[f"{tb}.{theirs}.{kind}"]
          out[f"{jb}.{ours}.{kind}"] = swap(value) if theirs == "norm1_context.linear" and i == num_layers - 1 \
              else value
      for theirs, ours in (("attn.to_", "x_block.attn"), ("attn2.to_", "x_block.attn2"),
                           ("attn.add_", "context_block.attn")):
        parts = [f"{tb}.{theirs}{c}{'_proj' if 'add' in theirs else ''}.{kind}" for c in "qkv"]
        if parts[0] in tensors:
          out[f"{jb}.{ours}.qkv.{kind}"] = np.concatenate([tensors[k] for k in parts])
    for theirs, ours in norm_map.items():
      if f"{tb}.{theirs}.weight" in tensors:
        out[f"{jb}.{ours}.weight"] = tensors[f"{tb}.{theirs}.weight"]
  fused = 2 * num_layers + len([k for k in tensors if k.endswith(".attn2.to_q.weight")])  # 3 linears -> 1 each
  assert len(out) == len(tensors) - 4 * fused, "a diffusers key was not mapped"
  return {f"model.diffusion_model.{k}": v for k, v in out.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_stability_layout(converted, variant):
  model, tensors, ours = converted[variant]
  stab = stability_state_dict(tensors, ours.config.num_layers)
  stab["first_stage_model.decoder.conv_in.weight"] = np.zeros((1,), np.float32)  # other parts of a single file
  cfg = mmdit_tables.infer_config(stab, "stability", None, sample_size=TINY["sample_size"], num_attention_heads=2)
  assert cfg == ours.config
  model_s = mmdit_tables.to_model(stab, cfg, "stability")
  x, t, context, pooled = sd3_inputs(12, 20)
  assert rel_err(model_s(x, t, context, pooled), torch_forward(model, x, t, context, pooled)) <= 1e-5
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
  """Rematerialised and scanned blocks (runs of dual-attention / plain / pre-only blocks, also with a skipped block
  splitting a run) give the plain forward and gradients."""
  import jax
  from flax import nnx

  cfg = MMDiTConfig(**{**TINY, "num_layers": 5}, qk_norm="rms_norm", dual_attention_layers=(0, 1))
  graphdef, state = nnx.split(MMDiT(cfg, rngs=nnx.Rngs(0)))
  state = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(jax.random.key(v.size), v.shape), state)  # no zeros
  x, t, context, pooled = sd3_inputs(12, 20)
  flat = lambda tree: np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])

  def loss(state, remat, scan, skip):
    model = nnx.merge(graphdef, state)
    model.remat, model.scan_layers = remat, scan
    return jnp.sum(model(x, t, context, pooled, skip_layers=skip) ** 2)

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2, 3))
  for remat, skip in (("full", ()), ("dots", (2,))):
    want, want_grads = grad(state, "none", False, skip)
    got, grads = grad(state, remat, True, skip)
    err = rel_err(flat(grads), flat(want_grads))
    assert abs(got - want) <= 1e-6 * abs(want) and err <= 1e-5, f"loss {got} vs {want}, grads rel err {err:.1e}"
