"""FLUX.1 parity with diffusers' FluxTransformer2DModel (dev-like and schnell-like, square and non-square latents, two
text lengths), the BFL single-file layout checked against diffusers' own converter, exact export in both layouts,
strict one-line errors and the checkpoint round trip."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import dit_jax
from dit_jax import checkpoint, kinds
from dit_jax.convert import flux_tables
from dit_jax.convert.readers import ConversionError, read_source
from dit_jax.models.flux import Flux, FluxConfig, image_ids, pack, rope_table, unpack
from tests.helpers import rel_err
from tests.helpers.flux_reference import (FLUX_TINY, FLUX_VARIANTS, bfl_state_dict, diffusers_flux, diffusers_from_bfl,
                                          flux_forward)

# (latent height, width, text tokens): square and non-square latents (rows and columns differ in the ids), two text
# lengths
CASES = [(8, 8, 5), (6, 10, 9)]
TOL = 1e-5


def flux_inputs(height: int, width: int, text_len: int, guidance: bool, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, height, width, FLUX_TINY["in_channels"] // 4)).astype(np.float32)
  t = np.array([0.25, 1.0], np.float32)
  context = rng.standard_normal((2, text_len, FLUX_TINY["joint_attention_dim"])).astype(np.float32)
  pooled = rng.standard_normal((2, FLUX_TINY["pooled_projection_dim"])).astype(np.float32)
  g = np.array([3.5, 1.0], np.float32) if guidance else None
  return x, t, context, pooled, g


def expected_config(variant: str) -> FluxConfig:
  f = FLUX_TINY
  return FluxConfig(in_channels=f["in_channels"], out_channels=f["in_channels"], num_layers=f["num_layers"],
                    num_single_layers=f["num_single_layers"], attention_head_dim=f["attention_head_dim"],
                    num_attention_heads=f["num_attention_heads"], joint_attention_dim=f["joint_attention_dim"],
                    pooled_projection_dim=f["pooled_projection_dim"], axes_dims_rope=f["axes_dims_rope"],
                    **FLUX_VARIANTS[variant])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """variant -> (diffusers model, source tensors, converted Flux), via save_pretrained -> read_source."""
  out = {}
  for i, (name, kw) in enumerate(FLUX_VARIANTS.items()):
    model = diffusers_flux(seed=i, **kw)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    source = read_source(folder)
    layout = flux_tables.detect_layout(source.tensors)
    cfg = flux_tables.infer_config(source.tensors, layout, source.diffusers_config)
    out[name] = (model, source.tensors, flux_tables.to_model(source.tensors, cfg, layout))
  return out


def _params(model) -> dict:
  return checkpoint.flat_params(model)


@pytest.mark.parametrize("variant", FLUX_VARIANTS)
def test_infer_config(converted, variant):
  assert converted[variant][2].config == expected_config(variant)


@pytest.mark.parametrize("variant", FLUX_VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-L{c[2]}")
def test_forward_parity(converted, variant, case):
  model, _, ours = converted[variant]
  *shape, text_len = case
  x, t, context, pooled, g = flux_inputs(*shape, text_len, variant == "dev")
  ref = flux_forward(model, x, t, context, pooled, g)
  out = ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(context), jnp.asarray(pooled), g)
  assert out.shape == ref.shape == x.shape
  err = rel_err(out, ref)
  assert err <= TOL, f"{variant} {case}: relative error {err:.2e}"


def test_jit_and_scan_layers_agree(converted):
  _, _, ours = converted["dev"]
  x, t, context, pooled, g = flux_inputs(6, 10, 5, True)
  eager = ours(x, t, context, pooled, g)
  jitted = nnx.jit(lambda m, *a: m(*a))(ours, x, t, context, pooled, g)
  cfg = ours.config
  scan = nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0), scan_layers=True, remat="full"))
  graphdef, _ = nnx.split(scan)
  scan = nnx.merge(graphdef, kinds.get("flux").stack_blocks(cfg, nnx.state(ours)))
  scanned = scan(x, t, context, pooled, g)
  assert rel_err(jitted, eager) <= TOL and rel_err(scanned, eager) <= TOL


def test_rope_table_and_packing_match_diffusers(converted):
  from diffusers import FluxPipeline

  model = converted["dev"][0]
  ids = np.concatenate([np.zeros((5, 3)), image_ids(3, 5)])
  cos, sin = rope_table(ids, FLUX_TINY["axes_dims_rope"], 10_000)
  ref_cos, ref_sin = model.pos_embed(torch.from_numpy(ids).float())
  assert np.array_equal(cos, ref_cos.numpy()) and np.array_equal(sin, ref_sin.numpy())
  ref_ids = FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32).numpy()
  assert np.array_equal(image_ids(3, 5), ref_ids)
  x = np.random.default_rng(0).standard_normal((2, 6, 10, 4)).astype(np.float32)
  ref = FluxPipeline._pack_latents(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), 2, 4, 6, 10).numpy()
  assert np.array_equal(pack(x), ref) and np.array_equal(unpack(pack(x), 6, 10), x)


@pytest.mark.parametrize("variant", FLUX_VARIANTS)
def test_diffusers_export_is_exact_inverse(converted, variant):
  _, tensors, ours = converted[variant]
  back = flux_tables.from_model(ours, "diffusers")
  assert set(back) == set(tensors)
  for key, value in tensors.items():
    assert back[key].shape == value.shape and np.array_equal(back[key], np.asarray(value)), key


@pytest.mark.parametrize("variant", FLUX_VARIANTS)
def test_bfl_layout(converted, variant):
  model, _, ours = converted[variant]
  bfl = bfl_state_dict(model.state_dict())
  # the helper's BFL file is what diffusers' own single-file converter turns back into this model
  upstream = diffusers_from_bfl(bfl, ours.config.hidden_size)
  state = model.state_dict()
  assert set(upstream) == set(state) and all(torch.equal(upstream[k], state[k]) for k in state)
  assert len(bfl) == 4 + 8 + 4 + (4 if variant == "dev" else 0) + 2 * 24 + 2 * 8  # 780 / 776 at full depth
  comfy = {f"model.diffusion_model.{k}": v for k, v in bfl.items()}
  for source in (bfl, comfy):
    assert flux_tables.detect_layout(source) == "bfl"
    cfg = flux_tables.infer_config(source, "bfl", axes_dims_rope=FLUX_TINY["axes_dims_rope"])
    assert cfg == ours.config
    from_bfl = flux_tables.to_model(source, cfg, "bfl")
    a, b = _params(from_bfl), _params(ours)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  x, t, context, pooled, g = flux_inputs(6, 10, 9, variant == "dev", seed=1)
  err = rel_err(from_bfl(x, t, context, pooled, g), flux_forward(model, x, t, context, pooled, g))
  assert err <= TOL, f"bfl {variant}: relative error {err:.2e}"
  back = flux_tables.from_model(from_bfl, "bfl")
  assert set(back) == set(bfl) and all(np.array_equal(back[k], bfl[k]) for k in bfl)


def _error(fn, *args, **kwargs) -> str:
  with pytest.raises((ConversionError, ValueError)) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message, message
  return message


def test_strict_conversion(converted):
  _, tensors, ours = converted["dev"]
  cfg = ours.config
  to = lambda t, c=cfg, layout="diffusers": flux_tables.to_model(t, c, layout)
  missing = {k: v for k, v in tensors.items() if k != "transformer_blocks.1.attn.norm_added_k.weight"}
  assert "missing keys: transformer_blocks.1.attn.norm_added_k.weight" in _error(to, missing)
  piece = {k: v for k, v in tensors.items() if k != "single_transformer_blocks.1.attn.to_k.weight"}
  assert "missing keys: single_transformer_blocks.1.attn.to_k.weight" in _error(to, piece)
  extra = {**tensors, "transformer_blocks.0.attn.to_add_out.extra": np.zeros((2,), np.float32)}
  assert "unexpected keys: transformer_blocks.0.attn.to_add_out.extra" in _error(to, extra)
  wrong = {**tensors, "proj_out.bias": np.zeros((15,), np.float32)}
  assert "wrong shape: proj_out.bias (15,), expected (16,)" in _error(to, wrong)
  nan = dict(tensors)
  nan["context_embedder.bias"] = np.full((64,), np.nan, np.float32)
  assert "NaN or Inf values in context_embedder.bias" in _error(to, nan)
  assert flux_tables.to_model(nan, cfg, "diffusers", allow_nonfinite=True) is not None
  ints = {**tensors, "proj_out.bias": np.zeros((16,), np.int32)}
  assert "not a float dtype" in _error(to, ints)
  # a schnell config on dev weights leaves the guidance embedder unexpected
  assert "unexpected keys: time_text_embed.guidance_embedder" in _error(
      to, tensors, dataclasses.replace(cfg, guidance_embeds=False))
  assert "unknown FLUX layout 'stability'" in _error(to, tensors, cfg, "stability")


def test_infer_config_errors(converted):
  _, tensors, _ = converted["schnell"]
  infer = flux_tables.infer_config
  assert "missing key x_embedder.weight" in _error(infer, {k: v for k, v in tensors.items()
                                                           if k != "x_embedder.weight"}, "diffusers")
  gap = {k: v for k, v in tensors.items() if not k.startswith("single_transformer_blocks.0.")}
  message = _error(infer, gap, "diffusers", None, axes_dims_rope=(8, 12, 12))
  assert "missing keys for single_transformer_blocks.0" in message
  assert "cannot infer axes_dims_rope for 32-wide heads" in _error(infer, tensors, "diffusers")
  assert "num_layers=3 but the weights have 2" in _error(infer, tensors, "diffusers",
                                                         {"num_layers": 3, "axes_dims_rope": [8, 12, 12]})
  assert "guidance_embeds=True but the weights have False" in _error(
      infer, tensors, "diffusers", {"guidance_embeds": True, "axes_dims_rope": [8, 12, 12]})
  assert "describes 'SD3Transformer2DModel'" in _error(infer, tensors, "diffusers",
                                                       {"_class_name": "SD3Transformer2DModel"})
  assert "axes_dims_rope [8, 12, 14] must be positive even widths summing to attention_head_dim 32" in _error(
      infer, tensors, "diffusers", None, axes_dims_rope=(8, 12, 14))
  assert "overrides num_layers are not supported" in _error(infer, tensors, "diffusers", None, num_layers=3)
  assert "not a FLUX state dict" in _error(flux_tables.detect_layout, {"pos_embed.proj.weight": 0})


def test_call_errors_and_config(converted):
  _, _, ours = converted["dev"]
  x, t, context, pooled, _ = flux_inputs(6, 10, 5, False)
  assert "guidance-distilled" in _error(ours, x, t, context, pooled)
  assert "expects (B, H, W, 4) NHWC latents with even H, W" in _error(ours, x[:, :5], t, context, pooled, t)
  assert "do not match 15 image and 5 text tokens" in _error(ours, x, t, context, pooled, t,
                                                             img_ids=image_ids(3, 4))
  cfg = ours.config
  assert FluxConfig.from_dict(cfg.to_dict()) == cfg
  assert "must be multiples of 4" in _error(dataclasses.replace, cfg, in_channels=18)
  # per-example ids equal the shared ones
  ids = np.broadcast_to(image_ids(3, 5), (2, 15, 3))
  assert np.array_equal(ours(x, t, context, pooled, t, img_ids=ids), ours(x, t, context, pooled, t))


def test_kind_and_checkpoint_round_trip(converted, tmp_path):
  _, _, ours = converted["schnell"]
  kind = kinds.of(ours)
  assert kind.name == "flux" and kinds.get("flux").tables is flux_tables
  assert "FLUX double=2 single=2" in kind.describe(ours.config)
  batch = {"image": np.zeros((1, 8, 8, 4)), "context": np.zeros((1, 5, 24))}
  assert kind.flops(ours.config, batch) > 0
  assert "FLUX model is conditioned on text embeddings" in _error(kind.prepare_sample, ours.config, None,
                                                                  method=None, shift=None, flow_convention=None)
  saved = dit_jax.save(ours, tmp_path / "flux")
  again = dit_jax.load(saved)
  assert isinstance(again, Flux) and again.config == ours.config
  a, b = _params(ours), _params(again)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  from safetensors.numpy import load_file

  from dit_jax.convert.files import export
  exported = load_file(export(saved, tmp_path / "flux1.safetensors", layout="original"))  # BFL keys, no prefix
  bfl = flux_tables.from_model(ours, "bfl")
  assert exported.keys() == bfl.keys() and all(np.array_equal(exported[k], bfl[k]) for k in bfl)


def test_bf16_compute_fp32_params_and_logical_names(converted):
  _, tensors, ours = converted["dev"]
  model = flux_tables.to_model(tensors, ours.config, "diffusers", dtype=jnp.bfloat16)
  assert model.img_in.kernel[...].dtype == jnp.float32 and model.img_in.dtype == jnp.bfloat16
  metas = [v.get_metadata() for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  unnamed = [m for m in metas if (m.get("out_sharding") or m.get("sharding_names")) is None]
  assert metas and not unnamed, "every parameter carries logical axis names"
