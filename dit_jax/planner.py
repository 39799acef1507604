"""Ahead-of-time plan of a training job: compile the real :class:`~dit_jax.trainer.Trainer` step for a device
topology (a TPU slice compiles on any host through libtpu) and read XLA's figures: per-chip memory, FLOPs,
collectives, custom-call kernels and the cost model's step time. ``tools/plan.py`` is the command line.
"""
from __future__ import annotations

import collections
import contextlib
import math
import os
import re
import sys
import time
from typing import Any

import jax
import ml_collections

from dit_jax import hardware, kinds, parallel
from dit_jax.trainer import Trainer

GiB = 1024**3
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
# libtpu on a host that is no TPU VM: no metadata server to ask, no workers, and no exclusive lock (nothing is run)
LIBTPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
_OPCODE = re.compile(r" ([a-z][a-z0-9-]*)\(")
_ARRAY = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]")


class PlanError(RuntimeError):
  """The plan cannot be made (no libtpu, unknown topology); the message is one line."""


@contextlib.contextmanager
def _quiet_stderr():
  sys.stderr.flush()
  saved = os.dup(2)
  with open(os.devnull, "w") as null:
    os.dup2(null.fileno(), 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def topology_devices(topology: str) -> list[jax.Device]:
  """The devices of a TPU topology such as 'v5p:2x2x1' (compile-only), or 'local' for this host's devices."""
  if topology == "local":
    return jax.devices()
  from jax.experimental import topologies

  for name, value in LIBTPU_ENV.items():
    os.environ.setdefault(name, value)
  try:
    with _quiet_stderr():  # libtpu's C++ start-up warns that this host is no TPU VM
      return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  except Exception as e:  # noqa: BLE001 - libtpu raises several types; one line for the user
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    if "tpu" in text.lower() and ("not found" in text.lower() or "unknown backend" in text.lower()):
      text = "libtpu is not installed (pip install -e .[tpu])"
    raise PlanError(f"cannot describe topology {topology!r}: {text}") from None


def instructions(hlo_text: str):
  """(opcode, result text, line) of every instruction in an HLO module's text."""
  for line in hlo_text.splitlines():
    head, sep, rhs = line.partition(" = ")
    if not sep or not head.strip().removeprefix("ROOT ").startswith("%"):
      continue
    match = _OPCODE.search(" " + rhs)
    if match:
      yield match.group(1), rhs[:match.start()], line


def _dims(shape_text: str) -> list[tuple[int, ...]]:
  return [tuple(int(d) for d in m.split(",") if d) for m in _ARRAY.findall(shape_text)]


def hlo_summary(hlo_text: str, param_sizes: set[int]) -> dict[str, Any]:
  """Counts of each collective (async starts count once), all-gathers of activations (a result of rank >= 3 whose
  size is no parameter's: XLA may gather a parameter reshaped), the custom-call targets, the Pallas / Triton
  kernels by name and their rank-4 result shapes ((batch per shard, heads per shard, tokens, head dim) for
  attention)."""
  counts = collections.Counter()
  activation_gathers, targets, kernels, kernel_shapes = [], collections.Counter(), collections.Counter(), set()
  for opcode, result, line in instructions(hlo_text):
    base = opcode.removesuffix("-start")
    if base in COLLECTIVES and not opcode.endswith("-done"):
      counts[base] += 1
      if base == "all-gather":
        activation_gathers += [s for s in _dims(result) if len(s) >= 3 and math.prod(s) not in param_sizes]
    elif opcode == "custom-call":
      target = re.search(r'custom_call_target="([^"]+)"', line)
      targets[target.group(1) if target else "?"] += 1
      if target and target.group(1) in ("tpu_custom_call", "__gpu$xla.gpu.triton"):
        name = re.sub(r"\.\d+$", "", line.split(" = ")[0].strip().removeprefix("ROOT ").lstrip("%"))
        kernels[name] += 1
        kernel_shapes.update(s for s in _dims(result) if len(s) == 4)
      elif target and "cudnn" in target.group(1):
        kernels[target.group(1)] += 1
  return {"all_gathers": counts["all-gather"], "activation_all_gathers": len(activation_gathers),
          "activation_all_gather_shapes": sorted({str(s) for s in activation_gathers})[:8],
          "all_reduces": counts["all-reduce"], "reduce_scatters": counts["reduce-scatter"],
          "collective_permutes": counts["collective-permute"], "all_to_alls": counts["all-to-all"],
          "custom_calls": sorted(targets), "kernels": dict(sorted(kernels.items())),
          "kernel_shapes": sorted(kernel_shapes)}


def _param_sizes(trainer: Trainer) -> set[int]:
  """Element counts of the model's variables (trained and frozen), and of one layer of a stacked (scanned) one."""
  state, rest = trainer.abstract_state()
  leaves = jax.tree.leaves((state.params, rest))
  return {math.prod(leaf.shape) for leaf in leaves} | {math.prod(leaf.shape[1:]) for leaf in leaves if leaf.ndim > 2}


def _memory(compiled, chip: hardware.Chip | None) -> dict[str, Any]:
  m = compiled.memory_analysis()
  total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  capacity = chip.hbm_bytes if chip else None
  return {"fits": None if capacity is None else bool(total <= capacity), "hbm_per_chip_gib": total / GiB,
          "hbm_capacity_gib": None if capacity is None else capacity / GiB,
          "arguments_gib": m.argument_size_in_bytes / GiB, "temporaries_gib": m.temp_size_in_bytes / GiB,
          "outputs_gib": m.output_size_in_bytes / GiB, "aliased_gib": m.alias_size_in_bytes / GiB}


def _cost(compiled) -> tuple[float | None, float | None]:
  """(XLA FLOPs per chip, cost-model seconds); the time is None where the model gives no positive figure."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops, seconds = cost.get("flops"), cost.get("optimal_seconds")
  return flops, seconds if seconds is not None and math.isfinite(seconds) and seconds > 0 else None


def _out_of_memory(error: Exception) -> dict[str, Any] | None:
  """A compile that fails for lack of HBM, as a 'does not fit' report (None for other errors)."""
  text = str(error)
  if "exceeds" not in text and "RESOURCE_EXHAUSTED" not in text:
    return None
  lines = [l.strip() for l in text.splitlines()]
  line = next((l for l in lines if "exceeds" in l), next((l for l in lines if "RESOURCE_EXHAUSTED" in l), text))
  needed = re.search(r"temporaries \(([\d.]+)G\)", text)
  return {"fits": False, "error": line[:300], "temporaries_gib": float(needed.group(1)) if needed else None,
          **dict.fromkeys(("hbm_per_chip_gib", "flops_per_chip", "all_gathers", "all_reduces", "reduce_scatters",
                           "custom_calls"))}


def plan(config: ml_collections.ConfigDict, topology: str, *, context_length: int | None = None,
         sample: bool = False) -> dict[str, Any]:
  """Compile ``config``'s train step for ``topology`` and report what XLA says about it (one dict, JSON-ready)."""
  devices = topology_devices(topology)
  chip = hardware.chip_of(devices[0])
  mesh = parallel.make_mesh(tuple(config.mesh_shape), devices=devices)
  trainer = Trainer(config, mesh)
  kind = kinds.get(config.model.kind)
  batch = kind.example_batch(config, config.global_batch_size, context_length)
  report: dict[str, Any] = {
      "config": config.model.kind, "topology": topology, "chips": len(devices),
      "chip": chip.name if chip else devices[0].device_kind, "mesh": dict(mesh.shape),
      "global_batch": config.global_batch_size, "compute_dtype": config.compute_dtype, "remat": config.remat,
      "scan_layers": config.scan_layers, "attention_impl": config.attention_impl,
      "batch_shapes": {k: list(v.shape) for k, v in batch.items()}}
  start = time.perf_counter()
  lowered = trainer.lower_step(batch)
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 - XLA reports an out-of-memory compile as a runtime error
    failed = _out_of_memory(e)
    if failed is None:
      raise
    return {**report, **failed, "compile_s": time.perf_counter() - start, "step_s": None, "mfu": None}
  report["compile_s"] = time.perf_counter() - start
  report.update(_memory(compiled, chip))
  flops, seconds = _cost(compiled)
  model_flops = 3 * kind.flops(trainer.model_config, batch) * config.global_batch_size / len(devices)
  if seconds and flops is not None and flops < 0.5 * model_flops:
    seconds, report["step_note"] = None, "XLA's cost model counts a loop (scan_layers) body once"
  report.update(flops_per_chip=flops, model_flops_per_chip=model_flops, step_s=seconds,
                mfu=model_flops / seconds / chip.bf16_flops if seconds and chip else None)
  report.update(hlo_summary(compiled.as_text(), _param_sizes(trainer)))
  if sample:
    report["sample"] = plan_sample(trainer, chip)
  return report


def plan_sample(trainer: Trainer, chip: hardware.Chip | None) -> dict[str, Any]:
  """The jitted sampler of ``config.sample`` on the trainer's mesh, for ``config.sample.num`` images."""
  from dit_jax.diffusion.samplers import sample

  config = trainer.config
  s = config.sample
  model = trainer.ema_model(*trainer.abstract_state())  # abstract: shapes only
  start = time.perf_counter()
  lowered = sample(model, kinds.get(config.model.kind).grid_cond(config, model, s.num), jax.random.key(0),
                   mesh=trainer.mesh, lower=True, method=s.method, steps=s.steps, cfg_scale=s.cfg_scale,
                   cfg_mode=s.cfg_mode, flow_convention=config.flow.convention, shift=config.flow.shift)
  compiled = lowered.compile()
  out = {"compile_s": time.perf_counter() - start, **_memory(compiled, chip)}
  flops, seconds = _cost(compiled)
  out.update(flops_per_chip=flops, step_s=seconds, images=s.num)
  out.update(hlo_summary(compiled.as_text(), set()))
  return out


def format_report(r: dict[str, Any]) -> str:
  """The report as aligned ``name: value`` lines."""
  gib = lambda v: "?" if v is None else f"{v:.2f} GiB"
  lines = [f"{r['config']} on {r['topology']} ({r['chips']} x {r['chip']}), mesh {r['mesh']}, global batch "
           f"{r['global_batch']}, {r['compute_dtype']}, remat {r['remat']}, scan {r['scan_layers']}, attention "
           f"{r['attention_impl']}"]
  if "error" in r:
    return "\n".join(lines + [f"fits: no (compile failed: {r['error']})", f"compile: {r['compile_s']:.1f} s"])
  fits = {True: "yes", False: "NO", None: "unknown chip"}[r["fits"]]
  lines += [
      f"HBM per chip: {gib(r['hbm_per_chip_gib'])} of {gib(r['hbm_capacity_gib'])} -> fits: {fits}",
      f"  arguments {gib(r['arguments_gib'])}, temporaries {gib(r['temporaries_gib'])}, outputs "
      f"{gib(r['outputs_gib'])} (donated {gib(r['aliased_gib'])})",
      f"compile: {r['compile_s']:.1f} s",
      f"FLOPs per chip: XLA {r['flops_per_chip']:.3e}, model (3 x forward) {r['model_flops_per_chip']:.3e}",
      "step time (XLA cost model): " + (f"unavailable ({r.get('step_note', 'no positive figure')})"
                                        if r["step_s"] is None else f"{r['step_s'] * 1e3:.1f} ms"),
      "MFU implied: " + ("unavailable" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"),
      f"collectives: {r['all_gathers']} all-gather ({r['activation_all_gathers']} of activations), "
      f"{r['all_reduces']} all-reduce, {r['reduce_scatters']} reduce-scatter, {r['collective_permutes']} "
      f"collective-permute, {r['all_to_alls']} all-to-all",
      f"custom calls: {', '.join(r['custom_calls']) or 'none'}; kernels: "
      + (", ".join(f"{k} x{n}" for k, n in r["kernels"].items()) or "none")]
  if "sample" in r:
    s = r["sample"]
    lines.append(f"sampler ({s['images']} images): HBM {gib(s['hbm_per_chip_gib'])}, compile {s['compile_s']:.1f} s, "
                 "time " + ("unavailable" if s["step_s"] is None else f"{s['step_s']:.3f} s"))
  return "\n".join(lines)
