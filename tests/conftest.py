"""pytest configuration and fixtures only (shared builders live in tests/helpers): fp32 'highest' matmuls, 2 torch
threads, JAX on the CPU (also where libtpu is installed for the TPU compile tests), and JAX's persistent compilation
cache in a per-user temporary folder, shared by the pytest workers and the processes tests start: many tests build
the same tiny models and train steps again (each Trainer jits anew), and a cached executable is the same program,
so results do not change. Set JAX_COMPILATION_CACHE_DIR to use another folder."""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"dit_jax-xla-cache-{os.getuid()}"))

import jax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
torch.set_num_threads(2)


@pytest.fixture
def tmp(tmp_path):
  return tmp_path
