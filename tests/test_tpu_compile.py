"""The demo-sized DiT and MMDiT train steps compiled ahead of time for a TPU v5e 2x2 slice on this CPU (libtpu's
deviceless compile): splash attention runs per shard inside the sharded step, no activation is all-gathered, and
the per-chip memory stays small. Skipped where libtpu is not installed (``pip install -e .[tpu]``)."""
from __future__ import annotations

import pytest

pytest.importorskip("libtpu", reason="libtpu is not installed (pip install -e .[tpu])")

from configs import demo, mmdit_demo  # noqa: E402
from dit_jax import planner  # noqa: E402

# Measured 2026-12-02 (jax 0.10.2, libtpu 0.0.42.1), FSDP over 4 chips: DiT 0.11 GiB, MMDiT 0.53 GiB per chip.
HBM_BOUND_GIB = 1.0


# The MMDiT compile takes about four minutes of CI's two cores: slow; the DiT one stays in CI.
@pytest.mark.parametrize("module", [demo, pytest.param(mmdit_demo, marks=pytest.mark.slow)], ids=["dit", "mmdit"])
def test_fsdp_step_compiles_for_tpu_with_splash_per_shard(module):
  config = module.get_config()
  config.mesh_shape = (1, 4, 1)
  report = planner.plan(config, "v5e:2x2")
  summary = {k: report.get(k) for k in ("kernels", "kernel_shapes", "activation_all_gather_shapes", "hbm_per_chip_gib", "mesh")}
  assert any(k.startswith("splash_mha_fwd") for k in report["kernels"]), f"no splash kernel: {summary}"
  assert any(k.startswith("splash_mha_dq") for k in report["kernels"]), f"no splash backward kernel: {summary}"
  per_shard = config.global_batch_size // 4
  assert all(shape[0] == per_shard for shape in report["kernel_shapes"]), f"kernel not per shard: {summary}"
  assert report["activation_all_gathers"] == 0, f"activations all-gathered: {summary}"
  assert report["all_gathers"] > 0, f"FSDP parameters were not gathered (is the mesh sharded?): {summary}"
  assert report["fits"] and report["hbm_per_chip_gib"] < HBM_BOUND_GIB, f"per-chip memory: {summary}"
