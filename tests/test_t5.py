"""T5 v1.1 encoder: parity with transformers' T5EncoderModel (tiny and at T5-XXL's real width), its bucket table,
bf16 / fp16 runs on large activations, strict hf-layout conversion and its exact inverse, fp16 sources, SD3
single-file selection, the t5_encoder checkpoint kind and a forward sharded over 8 simulated devices."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

import dit_jax
from dit_jax import checkpoint, kinds
from dit_jax.convert import t5_tables
from dit_jax.convert.readers import ConversionError, read_source
from dit_jax.models.t5 import T5_XXL, T5Encoder, T5EncoderConfig, num_params, relative_position_buckets
from tests.helpers import REPO_ROOT, rel_err
from tests.helpers.processes import device_env
from tests.helpers.t5_reference import (T5_TINY, T5_VARIANTS, T5_WIDE, hf_t5, hf_t5_forward, t5_ids,
                                        t5_state_dict)

TOL = 1e-5
B0 = "encoder.block.0.layer"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """variant -> (transformers model, tensors read back from its save_pretrained folder, converted T5Encoder)."""
  out = {}
  for i, (name, config) in enumerate(T5_VARIANTS.items()):
    model = hf_t5(config, seed=i)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    source = read_source(folder)
    layout = t5_tables.detect_layout(source.tensors)
    cfg = t5_tables.infer_config(source.tensors, layout, source.diffusers_config)
    out[name] = (model, source.tensors, t5_tables.to_model(source.tensors, cfg, layout))
  return out


def _run(model, ids, mask=None):
  return np.asarray(model(jnp.asarray(ids), None if mask is None else jnp.asarray(mask)).astype(jnp.float32))


@pytest.mark.parametrize("length", [77, 256, 512])
def test_buckets_equal_transformers(length):
  from transformers.models.t5.modeling_t5 import T5Attention

  offsets = torch.arange(length)[None, :] - torch.arange(length)[:, None]
  ref = T5Attention._relative_position_bucket(offsets, bidirectional=True, num_buckets=32, max_distance=128)
  ours = relative_position_buckets(length, 32, 128)
  assert ours.dtype == np.int32 and ours.shape == (length, length)
  assert np.array_equal(ours, ref.numpy()), f"{int((ours != ref.numpy()).sum())} buckets differ at L={length}"


@pytest.mark.parametrize("variant", T5_VARIANTS)
def test_infer_config_from_folder(converted, variant):
  assert converted[variant][2].config == T5EncoderConfig(**T5_VARIANTS[variant])


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("variant", T5_VARIANTS)
def test_forward_parity(converted, variant, masked):
  model, _, ours = converted[variant]
  ids, mask = t5_ids(3, 20, T5_TINY["vocab_size"], seed=1)
  mask = mask if masked else None
  err = rel_err(_run(ours, ids, mask), hf_t5_forward(model, ids, mask))
  assert err <= TOL, f"{variant} ({'mask' if masked else 'no mask'}) vs transformers: rel err {err:.2e}"


def test_forward_parity_real_width():
  """d_model 4096, 64 heads of 64, d_ff 10240 (T5-XXL's widths) with 2 layers: ~390 M parameters (~20 s, the
  acceptance's real-width check, so it runs in CI)."""
  model = hf_t5(T5_WIDE, seed=7)
  tensors = t5_state_dict(model)
  cfg = t5_tables.infer_config(tensors, "hf")
  assert (cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff) == (4096, 64, 64, 10240)
  ours = t5_tables.to_model(tensors, cfg, "hf")
  del tensors
  ids, mask = t5_ids(2, 16, T5_WIDE["vocab_size"], seed=2)
  for m in (None, mask):
    err = rel_err(_run(ours, ids, m), hf_t5_forward(model, ids, m))
    assert err <= TOL, f"real width ({'mask' if m is not None else 'no mask'}) vs transformers: rel err {err:.2e}"


def _large_activation_model():
  """A tiny transformers T5 whose residual stream grows past fp16's range (~1e5: embeddings x100, wo x1e4) and
  whose gated products reach ~1e3 (wi x30)."""
  model = hf_t5(T5_TINY, seed=4)
  with torch.no_grad():
    model.shared.weight.mul_(100.0)
    for block in model.encoder.block:
      ff = block.layer[1].DenseReluDense
      ff.wi_0.weight.mul_(30.0)
      ff.wi_1.weight.mul_(30.0)
      ff.wo.weight.mul_(1e4)
  return model


def _hf_half(model, dtype: torch.dtype):
  """transformers' half-precision T5 as ``from_pretrained(torch_dtype=...)`` builds it: wo kept in float32."""
  model = model.to(dtype)
  for block in model.encoder.block:
    block.layer[1].DenseReluDense.wo.float()
  return model


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_large_activations(dtype):
  """Compute and parameters in bf16 / fp16 (wo float32): finite, and on average as close to the fp32 oracle as
  transformers' own half-precision model (``from_pretrained(torch_dtype=...)``: wo float32)."""
  model = _large_activation_model()
  ids, _ = t5_ids(2, 20, T5_TINY["vocab_size"], seed=5)
  ref, states = hf_t5_forward(model, ids, hidden_states=True)
  peak = max(float(np.abs(h).max()) for h in states[1:-1])
  assert peak > 65504, f"the reference's residual stream peaks at {peak:.3g}: not a large-activation test"
  tensors = t5_state_dict(model)
  jdt = jnp.dtype(dtype)
  ours = t5_tables.to_model(tensors, t5_tables.infer_config(tensors, "hf"), "hf", dtype=jdt, param_dtype=jdt)
  assert ours.blocks[0].ff.wi_0.kernel.dtype == jdt and ours.blocks[0].ff.wo.kernel.dtype == jnp.float32
  out = ours(jnp.asarray(ids))
  assert out.dtype == jdt
  out = np.asarray(out.astype(jnp.float32))
  assert np.isfinite(out).all(), f"{dtype} output has non-finite values"
  theirs = hf_t5_forward(_hf_half(model, getattr(torch, dtype)), ids)
  mean_err = lambda a: float(np.abs(a - ref).mean() / np.abs(ref).mean())
  message = (f"{dtype} (stream peak {peak:.3g}) vs fp32: rel max err {rel_err(out, ref):.2e}, rel mean err "
             f"{mean_err(out):.2e}; transformers' {dtype} model {rel_err(theirs, ref):.2e}, {mean_err(theirs):.2e}")
  assert rel_err(out, ref) <= 3e-2 and mean_err(out) <= 1.25 * mean_err(theirs), message


def test_export_is_exact_inverse(converted):
  model, tensors, ours = converted["tiny"]
  assert "encoder.embed_tokens.weight" not in tensors  # save_pretrained writes one copy
  back = t5_tables.from_model(ours, "hf")
  assert set(back) == set(tensors)
  assert all(back[k].dtype == v.dtype and np.array_equal(back[k], v) for k, v in tensors.items())
  both = t5_state_dict(model)  # in memory: shared and encoder.embed_tokens, tied
  again = t5_tables.from_model(t5_tables.to_model(both, ours.config, "hf"), "hf", embedding=t5_tables.EMBEDDING_KEYS)
  assert set(again) == set(both) and all(np.array_equal(again[k], v) for k, v in both.items())
  only = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in tensors.items()}
  alias = t5_tables.to_model(only, t5_tables.infer_config(only, "hf"), "hf")
  ids, _ = t5_ids(2, 9, T5_TINY["vocab_size"])
  assert np.array_equal(_run(alias, ids), _run(ours, ids))
  with pytest.raises(ConversionError, match="embedding keys must be among"):
    t5_tables.from_model(ours, "hf", embedding=("embed.weight",))


def test_fp16_source_converts(tmp_path):
  model = hf_t5(T5_TINY, seed=3)
  path = tmp_path / "t5xxl_fp16.safetensors"
  save_file({k: v.half().contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"},
            str(path))
  with torch.no_grad():  # the fp32 oracle holds the same fp16-rounded weights
    for p in model.parameters():
      p.copy_(p.half().float())
  tensors = read_source(path).tensors
  assert {a.dtype for a in tensors.values()} == {np.dtype(np.float16)}
  ours = t5_tables.to_model(tensors, t5_tables.infer_config(tensors, "hf"), "hf")
  kernel = ours.blocks[0].ff.wo.kernel[...]
  assert kernel.dtype == jnp.float32
  assert np.array_equal(np.asarray(kernel), np.asarray(tensors[f"{B0}.1.DenseReluDense.wo.weight"], np.float32).T)
  ids, mask = t5_ids(2, 12, T5_TINY["vocab_size"])
  err = rel_err(_run(ours, ids, mask), hf_t5_forward(model, ids, mask))
  assert err <= TOL, f"fp16 source vs transformers: rel err {err:.2e}"


def test_sd3_single_file_selection(converted):
  _, tensors, ours = converted["tiny"]
  single = {t5_tables.SD3_PREFIX + k: v for k, v in tensors.items()}
  single["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = np.ones(3, np.float32)
  single["model.diffusion_model.context_embedder.weight"] = np.ones((2, 2), np.float32)
  assert t5_tables.select_t5_tensors(single).keys() == tensors.keys()
  full = {**tensors, "decoder.block.0.layer.0.SelfAttention.q.weight": np.ones(1), "lm_head.weight": np.ones(1)}
  assert t5_tables.select_t5_tensors(full).keys() == tensors.keys()
  model = t5_tables.to_model(single, t5_tables.infer_config(single, "hf"), "hf")
  ids, _ = t5_ids(1, 7, T5_TINY["vocab_size"])
  assert np.array_equal(_run(model, ids), _run(ours, ids))


def _one_line(fn, *args, **kw) -> str:
  with pytest.raises(ConversionError) as info:
    fn(*args, **kw)
  message = str(info.value)
  assert "\n" not in message, message
  return message


def test_strict_conversion_errors(converted):
  _, tensors, ours = converted["tiny"]
  cfg = ours.config
  to_model = lambda t: t5_tables.to_model(t, cfg, "hf")
  wo1 = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
  assert f"missing keys: {wo1}" in _one_line(to_model, {k: v for k, v in tensors.items() if k != wo1})
  extra = {**tensors, "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight": np.zeros((32, 4))}
  assert "unexpected keys: encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in _one_line(
      to_model, extra)
  wrong = {**tensors, "encoder.final_layer_norm.weight": np.ones(31, np.float32)}
  assert "wrong shape: encoder.final_layer_norm.weight (31,), expected (32,)" in _one_line(to_model, wrong)
  untied = {**tensors, "encoder.embed_tokens.weight": tensors["shared.weight"] + 1}
  assert "tied copies differ from shared.weight: encoder.embed_tokens.weight" in _one_line(to_model, untied)
  assert "unknown T5 encoder layout 'umt5'; choose one of hf" in _one_line(t5_tables.to_model, tensors, cfg, "umt5")
  bias = f"{B0}.0.SelfAttention.relative_attention_bias.weight"
  nan = {**tensors, bias: np.where(np.arange(4) == 1, np.nan, np.asarray(tensors[bias])).astype(np.float32)}
  assert f"NaN or Inf values in {bias}" in _one_line(to_model, nan)
  allowed = t5_tables.to_model(nan, cfg, "hf", allow_nonfinite=True)
  assert np.isnan(np.asarray(allowed.relative_attention_bias[...])[:, 1]).all()


def test_infer_config_errors(converted):
  _, tensors, _ = converted["tiny"]
  infer = lambda t, dcfg=None: t5_tables.infer_config(t, "hf", dcfg)
  bias = f"{B0}.0.SelfAttention.relative_attention_bias.weight"
  assert f"missing key {bias} (cannot infer the T5 encoder config)" in _one_line(
      infer, {k: v for k, v in tensors.items() if k != bias})
  gap = {k: v for k, v in tensors.items() if not k.startswith("encoder.block.1.")}
  assert "missing keys for encoder.block.1 (blocks are not numbered 0..2)" in _one_line(infer, gap)
  assert "config.json contradicts the weights: d_model=64 but the weights have 32" in _one_line(
      infer, tensors, {"d_model": 64, "num_heads": 4})
  assert "config.json describes a 'clip_text_model' model, not a T5 encoder" in _one_line(
      infer, tensors, {"model_type": "clip_text_model"})
  assert "config.json layer_norm_epsilon='1e-6' is not a finite number" in _one_line(
      infer, tensors, {"layer_norm_epsilon": "1e-6"})
  assert "feed_forward_proj 'relu' is not one of ('gated-gelu',)" in _one_line(
      infer, tensors, {"feed_forward_proj": "relu"})
  assert "not a T5 encoder state dict" in _one_line(t5_tables.detect_layout, {"context_embedder.weight": 0})
  overridden = t5_tables.infer_config(tensors, "hf", {"relative_attention_max_distance": 32},
                                      relative_attention_max_distance=64)
  assert overridden.relative_attention_max_distance == 64


def test_config_and_xxl_size():
  from transformers import T5Config, T5EncoderModel

  assert (T5_XXL.d_model, T5_XXL.d_kv, T5_XXL.d_ff, T5_XXL.num_layers, T5_XXL.num_heads) == (4096, 64, 10240, 24, 64)
  assert T5EncoderConfig.from_dict(T5_XXL.to_dict()) == T5_XXL
  with torch.device("meta"):
    hf = T5EncoderModel(T5Config(**{k: v for k, v in T5_XXL.to_dict().items()}))
  hf_count = sum(p.numel() for p in hf.parameters())  # the tied embedding once
  assert num_params(T5_XXL) == hf_count, (num_params(T5_XXL), hf_count)
  two = dataclasses.replace(T5_XXL, num_layers=2)  # XXL widths; the layers repeat
  ours = sum(v.size for v in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: T5Encoder(two, rngs=nnx.Rngs(0))))))
  assert ours == num_params(two), (ours, num_params(two))
  with pytest.raises(ValueError, match="invalid T5 encoder config: feed_forward_proj 'relu'"):
    T5EncoderConfig(feed_forward_proj="relu")
  model = T5Encoder(T5EncoderConfig(**T5_TINY), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"T5Encoder expects \(B, L\) integer token ids"):
    model(jnp.zeros((2, 3), jnp.float32))
  with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\), ids \(2, 3\)"):
    model(jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 4)))


def test_checkpoint_round_trip(converted, tmp_path):
  _, _, ours = converted["short"]
  kind = kinds.get("t5_encoder")
  assert kinds.of(ours) is kind
  assert kind.describe(ours.config).startswith("T5 encoder layers=3 d_model=32 heads=4x8 d_ff=48")
  path = dit_jax.save(ours, tmp_path / "t5")
  assert checkpoint.read_meta(path)["kind"] == "t5_encoder"
  loaded = dit_jax.load(path)
  assert isinstance(loaded, T5Encoder) and loaded.config == ours.config
  a, b = checkpoint.flat_params(ours), checkpoint.flat_params(loaded)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  ids, mask = t5_ids(2, 10, T5_TINY["vocab_size"])
  assert np.array_equal(_run(loaded, ids, mask), _run(ours, ids, mask))
  bf16 = dit_jax.load(path, dtype=jnp.bfloat16)
  assert bf16(jnp.asarray(ids)).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="the T5 encoder has no remat / scan_layers options"):
    kind.build(ours.config, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32, remat="full")
  with pytest.raises(ValueError, match="model kind 't5_encoder' cannot be sampled"):
    kind.prepare_sample(None, None, method=None, shift=None, flow_convention=None)


SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    jax.config.update("jax_default_matmul_precision", "highest")
    from dit_jax import parallel
    from dit_jax.models.t5 import T5Encoder, T5EncoderConfig
    assert jax.device_count() == 8, jax.devices()
    cfg = T5EncoderConfig(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    model = T5Encoder(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    keys = iter(jax.random.split(jax.random.key(1), 100))
    state = jax.tree.map(lambda a: 0.3 * jax.random.normal(next(keys), a.shape), state)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 64, (4, 12)), jnp.int32)
    mask = jnp.asarray(np.arange(12)[None] < np.array([12, 9, 5, 1])[:, None], jnp.int32)
    forward = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))
    single = np.asarray(forward(state, ids, mask))
    mesh = parallel.make_mesh((2, 2, 2))
    shardings = parallel.shardings(state, mesh)
    specs = {"/".join(map(str, p)): s.spec for p, s in nnx.to_flat_state(shardings)}
    assert specs["blocks/0/ff/wi_0/kernel"] == P("fsdp", "tensor"), specs
    assert specs["blocks/1/ff/wo/kernel"] == P("tensor", "fsdp"), specs
    assert specs["blocks/0/attn/q/kernel"] == P("fsdp", "tensor"), specs
    assert specs["shared/embedding"] == P(None, "fsdp"), specs
    assert specs["relative_attention_bias"] == P(None, "tensor"), specs
    state = jax.device_put(state, shardings)
    batch = parallel.batch_sharding(mesh, ndim=2)
    with jax.set_mesh(mesh):
        out = forward(state, jax.device_put(ids, batch), jax.device_put(mask, batch))
    assert len(out.sharding.device_set) == 8, out.sharding
    err = float(np.abs(np.asarray(out) - single).max() / np.abs(single).max())
    assert err < 1e-5, err
    print("t5 sharded vs single-device rel err", err)
""")


def test_sharded_forward_matches_single_device():
  """An fsdp x tensor x data (2, 2, 2) mesh with the project's rules: parameters sharded, same result."""
  result = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=device_env(8),
                          cwd=REPO_ROOT, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "t5 sharded vs single-device rel err" in result.stdout, result.stdout
