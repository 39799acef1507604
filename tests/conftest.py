"""pytest configuration and fixtures only (shared builders live in tests/helpers): fp32 'highest' matmuls, 2 torch
threads, JAX on the CPU (also where libtpu is installed for the TPU compile tests)."""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
torch.set_num_threads(2)


@pytest.fixture
def tmp(tmp_path):
  return tmp_path
