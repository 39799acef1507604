#!/usr/bin/env bash
# DiT-XL/2 bf16 on one GPU, dit_jax (attention cudnn and xla) vs diffusers + PyTorch (SDPA): forward, a 50-step
# sampling loop and a train step, printed as one table (bench/gpu.py). Under 8 minutes on an H100 / H200.
# Needs a Python with jax[cuda12], torch (CUDA) and diffusers; --install makes one in .venv-gpu with exactly:
#   python3 -m venv .venv-gpu && .venv-gpu/bin/pip install -e ".[cuda]" torch diffusers
#   bash bench/gpu.sh [--install] [bench/gpu.py args, e.g. --dry-run]      (PYTHON=... picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--install" ]; then
  shift
  python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install -q -e ".[cuda]" torch diffusers
  PYTHON=.venv-gpu/bin/python
fi
# JAX and torch share the GPU: JAX allocates on demand instead of taking 75% of the memory at start.
export XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=1
"${PYTHON:-python}" bench/gpu.py "$@"
