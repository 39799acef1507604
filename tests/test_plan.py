"""tools/plan.py without a TPU: the HLO reading (collectives, activation gathers, kernels) on a hand-written module,
the whole plan for this host's own devices, and its one-line errors."""
from __future__ import annotations

import json

import pytest

from dit_jax import planner
from tests.helpers.processes import one_line_error, run_cli
from tests.helpers.training import tiny_config

HLO = """\
ENTRY %main {
  %p0 = f32[256,1152]{1,0} parameter(0)
  %all-gather.1 = bf16[1152,3456]{1,0:T(8,128)} all-gather(%x), dimensions={0}
  %all-gather.2 = bf16[4,288,3456]{2,1,0} all-gather(%x), dimensions={0}
  %all-gather-start.3 = (f32[8,256,16,72]{3,2,1,0}, f32[64,256,16,72]{3,2,1,0}) all-gather-start(%y)
  %all-gather-done.3 = f32[64,256,16,72]{3,2,1,0} all-gather-done(%all-gather-start.3)
  %all-reduce.4 = (f32[1152]{0:T(1024)S(1)}, f32[]) all-reduce(%g, %h), to_apply=%add
  %splash_mha_fwd_residuals.5 = (f32[8,16,256,72]{3,2,1,0}, f32[8,16,256]{2,1,0}) custom-call(%q), custom_call_target="tpu_custom_call"
  ROOT %t = (f32[]) tuple(%all-reduce.4)
}
"""


def test_hlo_summary_counts_collectives_and_tells_activation_gathers_from_parameters():
  summary = planner.hlo_summary(HLO, param_sizes={1152 * 3456, 1152})
  assert summary["all_gathers"] == 3 and summary["all_reduces"] == 1, summary  # the async pair counts once
  # [4, 288, 3456] is a (1152, 3456) kernel gathered reshaped; the (64, 256, 16, 72) result is an activation
  assert summary["activation_all_gathers"] == 2 and "(64, 256, 16, 72)" in summary["activation_all_gather_shapes"]
  assert summary["custom_calls"] == ["tpu_custom_call"]
  assert summary["kernels"] == {"splash_mha_fwd_residuals": 1} and summary["kernel_shapes"] == [(8, 16, 256, 72)]


def test_plan_for_the_local_devices():
  """The real train step and sampler compiled for this host: memory and XLA's FLOPs come back; CPU has no
  published HBM."""
  report = planner.plan(tiny_config(), "local", sample=True)
  assert report["chips"] == 1 and report["fits"] is None and report["hbm_per_chip_gib"] > 0, report
  assert report["flops_per_chip"] > 0.5 * report["model_flops_per_chip"], report
  assert report["sample"]["flops_per_chip"] > 0 and report["sample"]["hbm_per_chip_gib"] > 0, report["sample"]
  json.dumps(report)  # --json prints it


@pytest.mark.parametrize("args, fragment", [
    (["--config", "configs/demo.py"], "--topology are required"),
    (["--config", "configs/demo.py", "--topology", "h100:8"], "without the device"),
    (["--config", "configs/demo.py", "--topology", "local", "--config.nope=1"], "nope"),
])
def test_cli_errors_are_one_line(args, fragment):
  result = run_cli("tools/plan.py", *args, timeout=120)
  one_line_error(result.returncode, result.stderr, fragment)


def test_an_out_of_memory_compile_is_a_does_not_fit_report():
  error = RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm.\n"
                       "Ran out of memory on HBM, the total memory required for HLO temporaries (201.33G) exceeds "
                       "available HBM (95.74G).")
  report = planner._out_of_memory(error)
  assert report["fits"] is False and report["temporaries_gib"] == 201.33, report
  assert report["hbm_per_chip_gib"] is None and "exceeds available HBM" in report["error"], report
  assert planner._out_of_memory(RuntimeError("INVALID_ARGUMENT: bad shape")) is None
