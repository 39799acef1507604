"""Published figures of accelerator chips: dense bf16 peak FLOP/s and HBM per chip (one JAX device), for MFU and
for the memory verdicts of ``tools/plan.py``. On CPU there is no published peak: MFU uses a measured matmul rate.
"""
from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  bf16_flops: float  # dense bf16 peak per JAX device, FLOP/s
  hbm_bytes: int  # HBM per JAX device


GiB = 1024**3
# JAX ``device_kind`` -> chip. v5p and v4 devices are whole chips (megacore); sources: Google Cloud TPU system
# architecture pages (v4 275, v5e 197, v5p 459, v6e 918 TF/s); NVIDIA data sheets (dense, no sparsity).
CHIPS = {
    "TPU v4": Chip("TPU v4", 275e12, 32 * GiB),
    "TPU v5 lite": Chip("TPU v5e", 197e12, 16 * GiB),
    "TPU v5e": Chip("TPU v5e", 197e12, 16 * GiB),
    "TPU v5": Chip("TPU v5p", 459e12, 95 * GiB),
    "TPU v5p": Chip("TPU v5p", 459e12, 95 * GiB),
    "TPU v6 lite": Chip("TPU v6e", 918e12, 32 * GiB),
    "TPU v6e": Chip("TPU v6e", 918e12, 32 * GiB),
    "NVIDIA A100-SXM4-40GB": Chip("A100 40GB", 312e12, 40 * GiB),
    "NVIDIA A100-SXM4-80GB": Chip("A100 80GB", 312e12, 80 * GiB),
    "NVIDIA H100 80GB HBM3": Chip("H100 SXM", 989e12, 80 * GiB),
    "NVIDIA H100 PCIe": Chip("H100 PCIe", 756e12, 80 * GiB),
    "NVIDIA H200": Chip("H200", 989e12, 141 * 10**9),
    "NVIDIA B200": Chip("B200", 2250e12, 180 * 10**9),
}


def chip_of(device: jax.Device) -> Chip | None:
  """The published figures of ``device``'s chip, or None (CPU, or a chip not in the table)."""
  return CHIPS.get(device.device_kind)
