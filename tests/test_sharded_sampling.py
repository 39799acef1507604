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
    keys = iter(jax.random.split(jax.random.key(1), 100))
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
""")


def test_sampling_sharded_over_8_devices_matches_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO))
  result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ddpm sharded" in result.stdout and "ddim sharded" in result.stdout
