"""Shared test helpers (test files import from here, never from each other or from conftest).

  tests.helpers            REPO_ROOT, rel_err
  tests.helpers.reference  random-weight upstream models (diffusers DiT / SD3 MMDiT) and checkpoint key layouts
  tests.helpers.training   tiny train configs, deterministic resumable toy loaders, metrics.jsonl losses and
                           metrics, tiny train.py command lines and their workdirs (checkpoints, a logged step)
  tests.helpers.processes  subprocess runners (CLIs, scripts on N simulated devices), the strict CLI-error check
  tests.helpers.clip_reference   random-weight transformers CLIPTextModel(WithProjection), SD3-shaped ids, the
                                 OpenCLIP key layout written independently of dit_jax's tables
  tests.helpers.t5_reference     random-weight transformers T5EncoderModel, its forward, tiny / real-width configs
  tests.helpers.tokenizer_files  real tokenizer files written offline (CLIP's BPE from open_clip's merges, a trained
                                 T5 SentencePiece) as diffusers tokenizer folders, and transformers' tokenizers
"""
from __future__ import annotations

import pathlib

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def rel_err(ours, ref) -> float:
  """Relative max-abs error max|ours - ref| / max|ref|."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())
