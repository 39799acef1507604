"""The CLIP text encoder against transformers' CLIPTextModel (CLIP-L-like: quick_gelu, no projection, padded with
EOS) and CLIPTextModelWithProjection (CLIP-G-like: exact gelu, projection, padded with 0) with random weights; the
OpenCLIP layout checked through diffusers' own OpenCLIP converter; bit-exact export; SD3 single-file prefixes;
strict one-line errors; the clip_text kind through dit_jax.checkpoint; a sharded forward."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from dit_jax import checkpoint, kinds, parallel
from dit_jax.convert import ConversionError, clip_tables
from dit_jax.models.clip import CLIP_G, CLIP_L, CLIPTextConfig, CLIPTextModel
from tests.helpers import rel_err
from tests.helpers.clip_reference import (CLIP_TINY_G, CLIP_TINY_L, EOS, hf_clip, hf_outputs, hf_state_dict,
                                          openclip_state_dict, sd3_ids)

TOL = 1e-5
# variant -> (reference config, with projection, pad id after EOS, seed)
VARIANTS = {"L": (CLIP_TINY_L, False, EOS, 0), "G": (CLIP_TINY_G, True, 0, 1)}
SDXL_PREFIX = "conditioner.embedders.1.model."


@nnx.jit(static_argnames=("hidden_layer",))
def _forward(model, ids, hidden_layer=-2):
  return model(ids, hidden_layer=hidden_layer)


def _params(model) -> dict:
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}


def _same_params(a, b) -> bool:
  pa, pb = _params(a), _params(b)
  return pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)


@pytest.fixture(scope="module")
def refs():
  """variant -> dict(model (torch), config (config.json dict), tensors (hf file keys), ids, out (reference),
  ours (converted))."""
  out = {}
  for name, (config, projection, pad, seed) in VARIANTS.items():
    model = hf_clip(config, projection=projection, seed=seed)
    tensors = hf_state_dict(model)
    ids = sd3_ids(3, pad=pad, seed=seed)
    dcfg = model.config.to_dict()
    cfg = clip_tables.infer_config(tensors, "hf", dcfg)
    out[name] = dict(model=model, config=dcfg, tensors=tensors, ids=ids, out=hf_outputs(model, ids),
                     ours=clip_tables.to_model(tensors, cfg, "hf"))
  return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_infer_config(refs, variant):
  config, projection, _, _ = VARIANTS[variant]
  r = refs[variant]
  want = CLIPTextConfig(**{**config, "projection_dim": config["projection_dim"] if projection else None})
  assert r["ours"].config == want
  # without config.json: heads and the activation come from the caller (tiny widths are neither CLIP-L nor G)
  bare = clip_tables.infer_config(r["tensors"], "hf", num_attention_heads=4, hidden_act=config["hidden_act"])
  assert bare == want


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_parity(refs, variant):
  r = refs[variant]
  ref, ids = r["out"], jnp.asarray(r["ids"])
  ours = _forward(r["ours"], ids)
  pairs = {"hidden_states[-2]": (ours["hidden"], ref["hidden_states"][-2]), "last_hidden_state": (ours["last"],
           ref["last"]), "pooler_output": (ours["pooled"], ref["pooled"])}
  if "text_embeds" in ref:
    pairs["text_embeds"] = (ours["text_embeds"], ref["text_embeds"])
  else:
    assert "text_embeds" not in ours
  if variant == "G":
    pairs["hidden_states[-3] (clip_skip 1)"] = (_forward(r["ours"], ids, hidden_layer=-3)["hidden"],
                                                ref["hidden_states"][-3])
  for what, (a, b) in pairs.items():
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = rel_err(a, b)
    assert err <= TOL, f"CLIP-{variant} {what}: rel err {err:.2e}"


def test_bf16_compute(refs):
  r = refs["G"]
  model = clip_tables.to_model(r["tensors"], r["ours"].config, "hf", dtype=jnp.bfloat16)
  assert model.layers[0].mlp.fc1.kernel[...].dtype == jnp.float32  # parameters stay fp32
  out = _forward(model, jnp.asarray(r["ids"]))
  for key, ref in (("hidden", r["out"]["hidden_states"][-2]), ("pooled", r["out"]["pooled"]),
                   ("text_embeds", r["out"]["text_embeds"])):
    assert out[key].dtype == jnp.bfloat16
    err = rel_err(out[key], ref)
    assert err <= 3e-2, f"bf16 {key}: rel err {err:.2e}"


def test_transformers_files_both_ways(refs, tmp_path):
  """A save_pretrained folder (transformers >= 5.6 writes a CLIPTextModel without ``text_model.``) converts; the
  export (``text_model.*``) loads back into transformers bit-exactly."""
  r = refs["L"]
  r["model"].save_pretrained(tmp_path / "saved")
  saved = load_file(tmp_path / "saved" / "model.safetensors")
  dcfg = json.loads((tmp_path / "saved" / "config.json").read_text())
  layout = clip_tables.detect_layout(saved)
  ours = clip_tables.to_model(saved, clip_tables.infer_config(saved, layout, dcfg), layout)
  assert layout == "hf" and _same_params(ours, r["ours"])

  from transformers import CLIPTextModel as HFCLIPTextModel
  (tmp_path / "export").mkdir()
  save_file(clip_tables.from_model(ours, "hf"), tmp_path / "export" / "model.safetensors", metadata={"format": "pt"})
  (tmp_path / "export" / "config.json").write_text(json.dumps(dcfg))
  back = HFCLIPTextModel.from_pretrained(tmp_path / "export")
  theirs, mine = r["model"].state_dict(), back.state_dict()
  assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in theirs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_openclip_layout(refs, variant):
  """OpenCLIP keys (SDXL's prefix) give the same model; diffusers' OpenCLIP converter reads the same keys back
  into exactly the transformers state (so the reference layout is right, independently of dit_jax)."""
  from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

  r = refs[variant]
  native = openclip_state_dict(r["tensors"])
  file = {SDXL_PREFIX + k: v for k, v in native.items()}
  theirs = convert_open_clip_checkpoint(r["model"], {k: torch.from_numpy(v) for k, v in file.items()}, SDXL_PREFIX)
  assert theirs.keys() == r["tensors"].keys()
  assert all(np.array_equal(theirs[k].numpy(), r["tensors"][k]) for k in theirs)

  assert clip_tables.detect_layout(file) == "openclip"
  cfg = clip_tables.infer_config(file, "openclip", num_attention_heads=4, hidden_act=r["ours"].config.hidden_act)
  assert cfg == r["ours"].config
  assert _same_params(clip_tables.to_model(file, cfg, "openclip"), r["ours"])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", ["hf", "openclip"])
def test_export_is_exact_inverse(refs, variant, layout):
  r = refs[variant]
  source = r["tensors"] if layout == "hf" else openclip_state_dict(r["tensors"], logit_scale=False)
  model = clip_tables.to_model(source, r["ours"].config, layout)
  back = clip_tables.from_model(model, layout)
  assert back.keys() == source.keys()
  assert all(back[k].dtype == source[k].dtype and np.array_equal(back[k], source[k]) for k in source)


def test_sd3_single_file_prefix(refs):
  g, l = refs["G"], refs["L"]
  single = {f"text_encoders.clip_g.transformer.{k}": v for k, v in g["tensors"].items()}
  single["text_encoders.clip_g.transformer.text_model.embeddings.position_ids"] = np.arange(77)[None]
  assert clip_tables.hf_prefix(single) == "text_encoders.clip_g.transformer."
  assert clip_tables.detect_layout(single) == "hf"
  cfg = clip_tables.infer_config(single, "hf", g["config"])
  assert cfg == g["ours"].config and _same_params(clip_tables.to_model(single, cfg, "hf"), g["ours"])
  both = single | {f"text_encoders.clip_l.transformer.{k}": v for k, v in l["tensors"].items()}
  with pytest.raises(ConversionError, match="found 2 hf CLIP text models, under 'text_encoders.clip_g.transformer"):
    clip_tables.detect_layout(both)
  with pytest.raises(ConversionError, match="no transformers CLIP text model"):
    clip_tables.hf_prefix(openclip_state_dict(g["tensors"]))


def _one_line_error(fn, *args, **kw) -> str:
  with pytest.raises(ConversionError) as info:
    fn(*args, **kw)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_strict_errors(refs):
  r = refs["G"]
  tensors, cfg = r["tensors"], r["ours"].config
  key = "text_model.encoder.layers.1.self_attn.k_proj.bias"
  missing = {k: v for k, v in tensors.items() if k != key}
  assert f"missing keys: {key}" in _one_line_error(clip_tables.to_model, missing, cfg, "hf")
  extra = {**tensors, "text_model.encoder.layers.3.mlp.fc1.bias": np.zeros(128, np.float32)}
  assert "unexpected keys: text_model.encoder.layers.3.mlp.fc1.bias" in _one_line_error(clip_tables.to_model,
                                                                                         extra, cfg, "hf")
  wrong = {**tensors, "text_projection.weight": np.zeros((48, 32), np.float32)}
  assert "wrong shape: text_projection.weight (48, 32), expected (48, 64)" in _one_line_error(
      clip_tables.to_model, wrong, cfg, "hf")
  native = openclip_state_dict(tensors)
  wrong = {**native, "transformer.resblocks.0.attn.in_proj_weight": np.zeros((64, 64), np.float32)}
  assert "wrong shape: transformer.resblocks.0.attn.in_proj_weight (64, 64), expected (192, 64)" in _one_line_error(
      clip_tables.to_model, wrong, cfg, "openclip")
  # a projection the config does not have
  assert "unexpected keys: text_projection.weight" in _one_line_error(
      clip_tables.to_model, tensors, dataclasses.replace(cfg, projection_dim=None), "hf")
  nan = {**tensors, "text_model.final_layer_norm.bias": np.full(64, np.nan, np.float32)}
  assert "NaN or Inf values in text_model.final_layer_norm.bias" in _one_line_error(clip_tables.to_model, nan, cfg,
                                                                                    "hf")
  assert np.isnan(clip_tables.to_model(nan, cfg, "hf", allow_nonfinite=True).final_layer_norm.bias[...]).all()
  assert "unknown CLIP text layout 'x'" in _one_line_error(clip_tables.to_model, tensors, cfg, "x")
  assert "not a CLIP text encoder state dict" in _one_line_error(clip_tables.detect_layout, {"a.weight": np.zeros(1)})
  no_fc1 = {k: v for k, v in tensors.items() if k != "text_model.encoder.layers.0.mlp.fc1.weight"}
  assert "missing key text_model.encoder.layers.0.mlp.fc1.weight" in _one_line_error(
      clip_tables.infer_config, no_fc1, "hf")
  assert "cannot tell the activation of a 64-wide CLIP" in _one_line_error(clip_tables.infer_config, tensors, "hf")
  assert "hidden_act 'relu'" in _one_line_error(clip_tables.infer_config, tensors, "hf", hidden_act="relu")


def test_config_json_checked_against_the_weights(refs):
  """transformers' config.json is checked before use: another model type, impossible values, a contradiction."""
  r = refs["G"]
  for change, fragment in [(dict(model_type="t5"), "describes a 't5' model, not a CLIP text encoder"),
                           (dict(num_attention_heads=0), "num_attention_heads"),
                           (dict(num_hidden_layers=-3), "num_hidden_layers"),
                           (dict(hidden_act="swish"), "hidden_act 'swish'"),
                           (dict(hidden_size=128), "hidden_size=128 but the weights have 64")]:
    assert fragment in _one_line_error(clip_tables.infer_config, r["tensors"], "hf", {**r["config"], **change})
  assert "not a JSON object" in _one_line_error(clip_tables.infer_config, r["tensors"], "hf", ["x"])


def test_model_input_errors(refs):
  model = refs["L"]["ours"]
  for ids, hidden_layer, match in ((np.zeros((1, 78), np.int32), -2, "78 tokens exceed max_position_embeddings 77"),
                                   (np.zeros((1, 5), np.int32), -5, r"hidden_layer -5 outside the 4 hidden states"),
                                   (np.zeros((5,), np.int32), -2, r"expects \(B, L\) integer token ids")):
    with pytest.raises(ValueError, match=match):
      model(jnp.asarray(ids), hidden_layer=hidden_layer)
  with pytest.raises(ValueError, match="hidden_size 30 is not divisible by num_attention_heads 4"):
    CLIPTextConfig(hidden_size=30, num_attention_heads=4)


def test_presets_match_transformers_sizes():
  """CLIP_L / CLIP_G (cut to 2 layers, to build quickly) have as many parameters as transformers'
  CLIPTextModelWithProjection of the same config."""
  from transformers import CLIPTextConfig as HFConfig
  from transformers import CLIPTextModelWithProjection

  assert (CLIP_L.num_hidden_layers, CLIP_G.num_hidden_layers) == (12, 32)
  for preset in (dataclasses.replace(CLIP_L, num_hidden_layers=2), dataclasses.replace(CLIP_G, num_hidden_layers=2)):
    with torch.device("meta"):
      theirs = CLIPTextModelWithProjection(HFConfig(**dataclasses.asdict(preset)))
    ours = nnx.eval_shape(lambda: CLIPTextModel(preset, rngs=nnx.Rngs(0)))
    count = sum(v.size for v in jax.tree.leaves(nnx.state(ours)))
    assert count == sum(p.numel() for p in theirs.parameters()), (preset, count)


def test_checkpoint_round_trip(refs, tmp_path):
  ours = refs["G"]["ours"]
  checkpoint.save(ours, tmp_path / "clip_g", extra={"source": {"layout": "hf"}})
  assert checkpoint.read_meta(tmp_path / "clip_g")["kind"] == "clip_text"
  loaded = checkpoint.load(tmp_path / "clip_g")
  assert isinstance(loaded, CLIPTextModel) and loaded.config == ours.config and _same_params(loaded, ours)
  kind = kinds.get("clip_text")
  assert "CLIP text layers=3 width=64 heads=4 act=gelu projection=48" == kind.describe(ours.config)
  with pytest.raises(ValueError, match="no remat / scan_layers"):
    kind.build(ours.config, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32, scan_layers=True)


def test_sharded_forward_and_logical_axes(refs):
  r = refs["G"]
  model = clip_tables.to_model(r["tensors"], r["ours"].config, "hf")
  state = nnx.state(model)
  specs = nnx.get_partition_spec(state)
  assert tuple(specs["layers"][0]["self_attn"]["qkv"]["kernel"].value) == ("embed", "heads")
  assert tuple(specs["token_embedding"]["embedding"].value) == (None, "embed")
  mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
  nnx.update(model, jax.device_put(state, parallel.shardings(state, mesh)))
  ids = jnp.asarray(r["ids"])
  with jax.set_mesh(mesh):
    out = _forward(model, jax.device_put(ids, parallel.batch_sharding(mesh, ndim=2)))
  ref = _forward(r["ours"], ids)
  assert all(np.array_equal(out[k], ref[k]) for k in ref)
