#!/usr/bin/env bash
# The embedded demo, one command on a fresh machine: install, train a small pixel-space DiT on scikit-learn's
# 8x8 digits with rectified flow (about 4 minutes on 2 CPU cores), sample a grid of requested digits, and check
# that a classifier trained on the real digits recognises the requested class (exit status 1 below 95%).
#   bash demo.sh [WORKDIR]          (default runs/demo; re-running resumes / reuses the trained model)
#   DEMO_PYTHON=python bash demo.sh [WORKDIR]   (use that interpreter, where dit_jax is installed: no .venv, no pip)
set -euo pipefail
cd "$(dirname "$0")"
WORKDIR=${1:-runs/demo}
if [ -z "${DEMO_PYTHON:-}" ]; then
  if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
  . .venv/bin/activate
  python -m pip install -q --upgrade pip
  python -m pip install -q -e .
  DEMO_PYTHON=python
fi
"$DEMO_PYTHON" train.py --config configs/demo.py --workdir "$WORKDIR"
"$DEMO_PYTHON" sample.py --checkpoint "$WORKDIR" --class-labels 0,1,2,3,4,5,6,7,8,9,0,1,2,3,4,5,6,7,8,9 --nrow 10 \
    --method euler --steps 32 --cfg-scale 2.0 --seed 0 --zoom 8 --out "$WORKDIR/digits.png"
"$DEMO_PYTHON" tools/demo_quality.py "$WORKDIR" --per-class 50
