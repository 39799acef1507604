"""Sampling sharded over 8 simulated CPU devices gives the single-device result (subprocess: XLA_FLAGS must be set
before JAX starts)."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from flax import nnx
    jax.config.update("jax_default_matmul_precision", "highest")
    from dit_jax.models.dit import DiT, DiTConfig
    from dit_jax.diffusion.samplers import sample
    assert jax.device_count() == 8, jax.devices()
    model = DiT(DiTConfig(input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    keys = iter(jax.random.split(jax.random.key(1), 1000))
    model = nnx.merge(graphdef, jax.tree.map(lambda a: 0.1 * jax.random.normal(next(keys), a.shape), state))
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    y = np.arange(8) % 11
    for method, kw in (("ddpm", dict(steps=6, cfg_scale=3.0)), ("ddim", dict(steps=4, cfg_scale=1.0))):
        single = sample(model, y, jax.random.key(0), method=method, **kw)
        sharded = sample(model, y, jax.random.key(0), method=method, mesh=mesh, **kw)
        assert len(sharded.sharding.device_set) == 8, sharded.sharding
        err = float(np.abs(np.asarray(single) - np.asarray(sharded)).max() / np.abs(np.asarray(single)).max())
        assert err < 1e-6, (method, err)
        print(method, "sharded vs single-device rel err", err)
    from dit_jax.models.mmdit import MMDiT, MMDiTConfig
    mm = MMDiT(MMDiTConfig(sample_size=8, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=16,
                           num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=32,
                           pooled_projection_dim=10, pos_embed_max_size=8, qk_norm="rms_norm",
                           dual_attention_layers=(0,)), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(mm)
    mm = nnx.merge(graphdef, jax.tree.map(lambda a: 0.1 * jax.random.normal(next(keys), a.shape), state))
    rng = np.random.default_rng(0)
    cond = {"context": rng.standard_normal((8, 5, 12)), "pooled": rng.standard_normal((8, 10))}
    kw = dict(method="dpmpp_2m_sd35", steps=5, cfg_scale=4.0, latent_size=(8, 6),
              skip_layer_guidance=dict(layers=[1], scale=2.5, start=0.0, stop=0.7))
    single = sample(mm, cond, jax.random.key(0), **kw)
    sharded = sample(mm, cond, jax.random.key(0), mesh=mesh, **kw)
    assert len(sharded.sharding.device_set) == 8, sharded.sharding
    err = float(np.abs(np.asarray(single) - np.asarray(sharded)).max() / np.abs(np.asarray(single)).max())
    assert err < 1e-5, ("mmdit", err)
    print("mmdit sharded vs single-device rel err", err)
    from dit_jax.models.flux import Flux, FluxConfig
    fx = Flux(FluxConfig(in_channels=16, out_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10,
                         guidance_embeds=True, axes_dims_rope=(4, 6, 6)), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(fx)
    fx = nnx.merge(graphdef, jax.tree.map(lambda a: 0.1 * jax.random.normal(next(keys), a.shape), state))
    kw = dict(steps=4, cfg_scale=2.0, negative={k: v[:1] for k, v in cond.items()}, guidance=3.5,
              latent_size=(6, 4), schedule="reference")
    single = sample(fx, cond, jax.random.key(0), **kw)
    sharded = sample(fx, cond, jax.random.key(0), mesh=mesh, **kw)
    assert len(sharded.sharding.device_set) == 8, sharded.sharding
    err = float(np.abs(np.asarray(single) - np.asarray(sharded)).max() / np.abs(np.asarray(single)).max())
    assert err < 1e-5, ("flux", err)
    print("flux sharded vs single-device rel err", err)
""")


def test_sampling_sharded_over_8_devices_matches_single_device():
  """DiT (ddpm with CFG, ddim), MMDiT (dpmpp_2m_sd35 with CFG and skip-layer guidance) and FLUX (dev-like:
  guidance input, resolution shift, true CFG) on a (4, 2) mesh."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO))
  result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  assert all(f"{m} sharded" in result.stdout for m in ("ddpm", "ddim", "mmdit", "flux")), result.stdout
