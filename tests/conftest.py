"""pytest configuration and fixtures only (shared builders live in tests/helpers): fp32 'highest' matmuls, 2 torch
threads."""
from __future__ import annotations

import jax
import pytest
import torch

jax.config.update("jax_default_matmul_precision", "highest")
torch.set_num_threads(2)


@pytest.fixture
def tmp(tmp_path):
  return tmp_path
