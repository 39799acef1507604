"""MMDiT training: rectified-flow loss (SD3 convention) with condition dropout, text-embedding shards joined with
latents, class tokens, sharding rules, 8-device equality, exact resume, and the SD3.5-Medium recipe config."""
from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import dit_jax
from dit_jax import checkpoint, data, parallel
from dit_jax.models.mmdit import MMDiT
from dit_jax.train import train
from dit_jax.trainer import Trainer, build_model, loss_fn
from dit_jax.train_config import validate
from tests.helpers.processes import run_on_devices
from tests.helpers.training import ToyTextLoader, losses, tiny_mmdit_config


def test_resume_reproduces_the_uninterrupted_run_and_load_returns_the_ema_mmdit(tmp):
  config = tiny_mmdit_config(steps=6)
  state = train(config, tmp / "full", loader=ToyTextLoader(8))
  train(tiny_mmdit_config(steps=3), tmp / "resumed", loader=ToyTextLoader(8))
  train(config, tmp / "resumed", loader=ToyTextLoader(8))  # resumes from step 3
  full, resumed = losses(tmp / "full"), losses(tmp / "resumed")
  assert sorted(full) == list(range(1, 7)) and full == resumed, (full, resumed)  # bitwise on CPU
  model = dit_jax.load(tmp / "full")
  assert isinstance(model, MMDiT) and model.config.dual_attention_layers == (0,)
  np.testing.assert_array_equal(model.joint_blocks[0].x_block.attn2.qkv.kernel[...],
                                state.ema["joint_blocks"][0]["x_block"]["attn2"]["qkv"]["kernel"][...])
  a, b = checkpoint.flat_params(model), checkpoint.flat_params(dit_jax.load(tmp / "resumed"))
  assert all(np.array_equal(a[k], b[k]) for k in a)
  meta = checkpoint.read_meta(tmp / "full")
  assert meta["kind"] == "mmdit" and meta["training"]["conditioning"]["kind"] == "class_tokens"


def test_bf16_with_grad_accumulation_remat_and_scan_runs(tmp):
  config = tiny_mmdit_config(steps=2)
  config.update(compute_dtype="bfloat16", grad_accum_steps=2, remat="full", scan_layers=True)
  state = train(config, tmp, loader=ToyTextLoader(8))
  assert int(state.step) == 2 and all(v.dtype == jnp.float32 for v in jax.tree.leaves(state.params))
  assert all(np.isfinite(v) for v in losses(tmp).values())


def _randomized_model(config):
  """A tiny MMDiT whose zero-initialised weights (adaLN-Zero, final layer) are random, so every input matters."""
  model = build_model(config, nnx.Rngs(1))
  for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
    if not np.any(var[...]):
      var[...] = 0.05 * jax.random.normal(jax.random.key(i), var.shape)
  return model


def test_loss_is_sd3_rectified_flow_and_condition_dropout_zeroes_context_and_pooled():
  config = tiny_mmdit_config()
  model = _randomized_model(config)
  batch = {k: jnp.asarray(v) for k, v in next(ToyTextLoader(8)).items()}
  zeroed = {**batch, "context": jnp.zeros_like(batch["context"]), "pooled": jnp.zeros_like(batch["pooled"])}

  def loss(prob, b):
    config.cond_dropout_prob = prob
    return float(loss_fn(config, model, b, jax.random.key(0)))

  dropped = loss(1.0, batch)
  assert dropped == loss(0.0, zeroed) and abs(dropped - loss(0.0, batch)) > 1e-3 * dropped
  # the SD3 convention spelled out: sigma ~ shift(logit-normal), x = (1 - s) x0 + s n, v = n - x0, t = 1000 s
  k_t, k_noise, _ = jax.random.split(jax.random.key(0), 3)
  x0 = batch["image"]
  noise = jax.random.normal(k_noise, x0.shape)
  s = jax.nn.sigmoid(jax.random.normal(k_t, (8,)))
  s = 3.0 * s / (1 + 2.0 * s)
  x = (1 - s)[:, None, None, None] * x0 + s[:, None, None, None] * noise
  want = float(jnp.mean((model(x, 1000 * s, batch["context"], batch["pooled"]) - (noise - x0)) ** 2))
  got = loss(0.0, batch)
  assert abs(got - want) <= 1e-6 * want, f"loss {got} vs spelled-out SD3 flow loss {want}"


@pytest.mark.parametrize("change,fragment", [
    (lambda c: setattr(c.model, "kind", "unet"), "model.kind 'unet'"),
    (lambda c: setattr(c, "objective", "vp"), "objective 'flow' and flow.convention 'sd3'"),
    (lambda c: setattr(c.flow, "convention", "sit"), "flow.convention 'sd3'"),
    (lambda c: setattr(c.data, "conditioning", "label"), "needs data.conditioning"),
    (lambda c: setattr(c, "cond_dropout_prob", 1.5), "cond_dropout_prob 1.5"),
    (lambda c: (setattr(c, "sample_every_steps", 5), setattr(c.sample, "method", "ddpm")), "not sample.method 'ddpm'"),
    (lambda c: setattr(c.mmdit, "caption_projection_dim", 48), "caption_projection_dim 48 must equal"),
    (lambda c: setattr(c.mmdit, "qk_norm", "layer_norm"), "qk_norm 'layer_norm'"),
])
def test_bad_mmdit_configs_are_one_line_errors(change, fragment):
  config = tiny_mmdit_config()
  change(config)
  with pytest.raises(ValueError, match=fragment) as e:
    validate(config)
  assert "\n" not in str(e.value)
  with config.unlocked():
    config.mmdit.heads = 2
  with pytest.raises(ValueError, match="unknown config key 'mmdit.heads'"):
    validate(config)


def _fake_latents(root, n: int, shard: int = 4):
  """A latents directory whose item i is the constant latent i (std 0), label i % 3."""
  root.mkdir()
  for k in range(-(-n // shard)):
    idx = np.arange(k * shard, min(n, (k + 1) * shard))
    mean = np.broadcast_to(idx[:, None, None, None, None], (len(idx), 2, 2, 2, 1)).astype(np.float16)
    np.savez(root / f"shard_{k:05d}.npz", mean=mean, std=np.zeros_like(mean), label=idx % 3, index=idx)
  manifest = {"format": "dit_jax.latents/1", "num_examples": n, "shard_size": shard, "num_shards": -(-n // shard),
              "shards_done": list(range(-(-n // shard))), "complete": True, "latent_shape": [2, 2, 1],
              "vae": {"scaling_factor": 1.0, "shift_factor": 0.0}, "num_classes": 3}
  (root / "manifest.json").write_text(json.dumps(manifest))


def test_text_shards_join_latents_row_by_row_and_resume(tmp):
  n = 10
  rng = np.random.default_rng(0)
  context, pooled = rng.standard_normal((n, 3, 16)).astype(np.float16), rng.standard_normal((n, 8))
  manifest = data.write_text_embedding_shards(tmp / "text", context, pooled, shard_size=4)
  assert manifest["num_shards"] == 3 and manifest["context_shape"] == [3, 16] and manifest["pooled_dim"] == 8
  _fake_latents(tmp / "latents", n)
  cfg = data.default_data_config()
  cfg.update(source="latents", folder=str(tmp / "latents"), conditioning="text", text_folder=str(tmp / "text"),
             num_workers=0)
  loader = data.make_loader(cfg, global_batch_size=4, seed=3, context_dim=16, pooled_dim=8)
  batches = [next(loader) for _ in range(3)]
  for b in batches:
    index = b["image"][:, 0, 0, 0].astype(int)  # the constant latent is the item index
    np.testing.assert_array_equal(b["context"], context[index].astype(np.float32))
    np.testing.assert_allclose(b["pooled"], pooled[index], rtol=1e-7)
    assert b["context"].dtype == b["pooled"].dtype == np.float32
  resumed = data.make_loader(cfg, global_batch_size=4, seed=3, context_dim=16, pooled_dim=8)
  loader2 = data.make_loader(cfg, global_batch_size=4, seed=3, context_dim=16, pooled_dim=8)
  next(loader2)
  resumed.set_state(loader2.get_state())
  np.testing.assert_array_equal(next(resumed)["context"], batches[1]["context"])
  with pytest.raises(ValueError, match="model expects 32 and 8"):
    data.make_loader(cfg, global_batch_size=4, seed=3, context_dim=32, pooled_dim=8)
  data.write_text_embedding_shards(tmp / "short", context[:9], pooled[:9], shard_size=4)
  cfg.text_folder = str(tmp / "short")
  with pytest.raises(ValueError, match="have 9 rows but the data source has 10 items"):
    data.make_loader(cfg, global_batch_size=4, seed=3)
  (tmp / "short" / "text_00001.npz").write_bytes((tmp / "text" / "text_00002.npz").read_bytes())  # 2 rows, not 4
  with pytest.raises(ValueError, match=r"text_00001.npz: context has shape \(2, 3, 16\), the manifest says \(4, 3"):
    data.TextEmbeddings(tmp / "short")
  with pytest.raises(ValueError, match="must match"):
    data.write_text_embedding_shards(tmp / "bad", context, pooled[:5])


def test_class_tokens_are_fixed_per_label_and_exposed_for_sampling():
  cfg = data.default_data_config()
  cfg.update(conditioning="class_tokens", class_token_length=4, class_token_seed=7, num_workers=0)
  batch = next(data.make_loader(cfg, global_batch_size=32, seed=0, context_dim=16, pooled_dim=8))
  assert batch["context"].shape == (32, 4, 16) and batch["pooled"].shape == (32, 8)
  tokens = data.ClassTokens(10, 4, 16, 8, seed=7)
  want = tokens(batch["label"])
  np.testing.assert_array_equal(batch["context"], want["context"])
  np.testing.assert_array_equal(batch["pooled"], want["pooled"])
  again = data.class_tokens_from_spec(json.loads(json.dumps(tokens.spec())))
  np.testing.assert_array_equal(again(np.arange(10))["context"], tokens.context)
  assert not np.allclose(tokens.context[0], tokens.context[1])
  with pytest.raises(ValueError, match="class id 10 is out of range 0..9"):
    tokens(np.array([3, 10]))


def _mesh_like(**sizes):
  return types.SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 1, **sizes})


def check_param_specs(config: ml_collections.ConfigDict, fsdp: int, tensor: int) -> dict[str, tuple]:
  """Every MMDiT parameter's PartitionSpec under DEFAULT_RULES on a (1, fsdp, tensor) mesh, checked."""
  abstract = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
  mesh = _mesh_like(fsdp=fsdp, tensor=tensor)
  out = {}
  state = nnx.state(abstract)
  specs = dict(nnx.to_flat_state(nnx.get_partition_spec(state)))
  for path, var in nnx.to_flat_state(state):
    name = ".".join(map(str, path))
    names = specs[path].value if isinstance(specs[path], nnx.Variable) else specs[path]
    assert len(tuple(names)) == var.value.ndim, f"{name} has no logical axis names ({names})"
    spec = tuple(parallel.logical_to_mesh(names, parallel.DEFAULT_RULES, mesh, var.value.shape))
    out[name] = spec
    if name.endswith(("ln_q.scale", "ln_k.scale")):
      assert spec == (None,), (name, spec)  # per-head RMSNorm: tiny, replicated
    elif name.endswith("kernel") and not name.startswith("final_layer.linear"):
      assert "fsdp" in spec, (name, spec)  # every matrix is sharded over fsdp along its hidden (embed) side
    inner = any(part in name for part in ("attn.qkv.kernel", "attn2.qkv.kernel", "fc1.kernel", "adaLN_modulation.kernel"))
    if inner and "y_embedder" not in name and "t_embedder" not in name:
      assert spec == ("fsdp", "tensor"), (name, spec)
  assert out["pos_embed"] == (None, "fsdp")
  return out


def test_recipe_sd35_medium_validates_and_shards_sensibly():
  from configs.mmdit_sd35m_latents import get_config

  config = get_config()
  validate(config)
  assert config.compute_dtype == "bfloat16" and config.flow.shift == 3.0 and config.cond_dropout_prob > 0
  # full width, 3 of the 24 layers (tracing all 24 abstractly takes ~15 s; the 384^2 table is built in numpy)
  config.mmdit.update(num_layers=3, dual_attention_layers=(0,), pos_embed_max_size=16)
  specs = check_param_specs(config, fsdp=8, tensor=2)
  assert specs["joint_blocks.0.x_block.attn2.proj.kernel"] == ("tensor", "fsdp")
  check_param_specs(tiny_mmdit_config(), fsdp=2, tensor=2)
  tiny = get_config()
  tiny.mmdit.update(num_layers=2, attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32,
                    joint_attention_dim=16, pooled_projection_dim=8, pos_embed_max_size=8, dual_attention_layers=(0,))
  trainer = Trainer(tiny, parallel.make_mesh((1, -1, 1), jax.devices()[:1]))
  state, _ = trainer.abstract_state()
  assert state.params["joint_blocks"][0]["x_block"]["attn2"]["qkv"]["kernel"].dtype == jnp.float32


MESH_SCRIPT = """
    from tests.helpers.training import ToyTextLoader, tiny_mmdit_config
    def params_after_3_steps(mesh):
        trainer = Trainer(tiny_mmdit_config(steps=3), mesh)
        state, rest = trainer.init()
        loader = ToyTextLoader(8)
        for _ in range(3):
            state, _ = trainer.step(state, rest, next(loader))
        return [np.asarray(x) for x in jax.tree.leaves(state.params)], state
    single, _ = params_after_3_steps(parallel.make_mesh((1, 1, 1), jax.devices()[:1]))
    scale = max(float(np.abs(b).max()) for b in single)
    for shape in [(8, 1, 1), (2, 2, 2), (1, 4, 2)]:
        params, state = params_after_3_steps(parallel.make_mesh(shape))
        sharded = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))
        err = max(float(np.abs(a - b).max()) for a, b in zip(params, single)) / scale
        print(json.dumps({"shape": shape, "rel_err": err, "sharded_params": sharded}))
        assert err < 1e-5, (shape, err)
        assert shape == (8, 1, 1) or sharded > 0, "fsdp/tensor meshes must shard parameters"
"""


def test_mmdit_meshes_match_single_device():
  out = run_on_devices(MESH_SCRIPT, 8).stdout
  rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  print(rows)
  assert len(rows) == 3 and all(r["rel_err"] < 1e-5 for r in rows), rows
