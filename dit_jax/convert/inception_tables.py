"""FID Inception-v3 key table, layout detection, config inference and export.

One layout, ``torch``: the state dict of torchvision's Inception3 as both FID ports save it, pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` (``fid_inception_v3()``) and torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` (``FeatureExtractorInceptionV3``). The two use the same key names
(``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``, ..., ``fc.weight`` / ``fc.bias``), so the
key names tell an Inception apart from other models, not one port's file from the other's; the source's sha256 goes
into the checkpoint's metadata (:func:`source_meta`) instead. BatchNorm's ``num_batches_tracked`` counters are
training state and are dropped (:func:`select_inception_tensors`); every other key is used, strictly.

    tensors = select_inception_tensors(tensors)
    layout = detect_layout(tensors)              # 'torch'
    cfg = infer_config(tensors, layout)
    model = to_model(tensors, cfg, layout)       # strict: every key used, every parameter filled
    tensors = from_model(model, layout)          # the exact inverse (no num_batches_tracked)
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.convert import engine
from dit_jax.convert.engine import MAX_LISTED, Path, Rule, apply_table, export_table, listing, need, pick_table
from dit_jax.convert.readers import ConversionError
from dit_jax.eval.inception import InceptionConfig, InceptionV3

__all__ = ["LAYOUTS", "OPS", "detect_layout", "file_sha256", "from_model", "infer_config", "is_inception",
           "select_inception_tensors", "source_meta", "to_model", "torch_table"]

MARKER = "Mixed_7c.branch3x3dbl_3b.conv.weight"  # a key only an Inception-v3 state dict has
COUNTER = ".num_batches_tracked"

# op -> (torch -> jax, jax -> torch): the engine's ops plus conv kernels OIHW <-> HWIO.
OPS: dict[str, tuple[Callable, Callable]] = {
    **engine.OPS,
    "conv": (lambda a: a.transpose(2, 3, 1, 0), lambda a, cfg: a.transpose(3, 2, 0, 1)),
}

# BasicConv2d names per block type (the torch attribute names, which are also ours).
_BRANCHES = {
    "A": ("branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3",
          "branch_pool"),
    "B": ("branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
    "C": ("branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1", "branch7x7dbl_2",
          "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"),
    "D": ("branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"),
    "E": ("branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"),
}
_STEM = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3")
_MIXED = (("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"), ("Mixed_6b", "C"),
          ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"), ("Mixed_7a", "D"), ("Mixed_7b", "E"),
          ("Mixed_7c", "E"))


def _basic_conv(target: Path, source: str) -> list[Rule]:
  """conv (no bias) + BatchNorm: weight / bias / running_mean / running_var -> scale / bias / mean / var."""
  bn = [(ours, f"{source}.bn.{theirs}") for ours, theirs in
        (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"), ("var", "running_var"))]
  return [Rule(target + ("conv", "kernel"), (f"{source}.conv.weight",), "conv"),
          *(Rule(target + ("bn", ours), (key,)) for ours, key in bn)]


def torch_table(cfg: InceptionConfig) -> list[Rule]:
  """pytorch-fid / torch-fidelity Inception-v3 state dict (torchvision Inception3 names, 1008 classes)."""
  rules = [r for name in _STEM for r in _basic_conv((name,), name)]
  for block, kind in _MIXED:
    rules += [r for branch in _BRANCHES[kind] for r in _basic_conv((block, branch), f"{block}.{branch}")]
  return rules + [Rule(("fc", "kernel"), ("fc.weight",), "T"), Rule(("fc", "bias"), ("fc.bias",))]


LAYOUTS = {"torch": torch_table}
ORIGINAL_LAYOUT = "torch"  # what export's layout "original" means for this family
FILE_PREFIX: dict[str, str] = {}  # layout -> the key prefix of an exported file


def is_inception(tensors) -> bool:
  """True for a state dict of the FID Inception-v3 (either port)."""
  return MARKER in tensors


def select_inception_tensors(tensors: dict[str, Any]) -> dict[str, Any]:
  """The state dict without BatchNorm's ``num_batches_tracked`` counters (training state, int64)."""
  return {k: v for k, v in tensors.items() if not k.endswith(COUNTER)}


def detect_layout(tensors) -> str:
  """'torch' (pytorch-fid's and torch-fidelity's files share it), from the key names."""
  if is_inception(tensors) and "Conv2d_1a_3x3.conv.weight" in tensors:
    return "torch"
  raise ConversionError(f"not an FID Inception-v3 state dict (no Conv2d_1a_3x3.conv.weight + {MARKER}); keys start "
                        f"with {listing(list(tensors)[:MAX_LISTED])}")


def infer_config(tensors, layout: str, diffusers_config: dict[str, Any] | None = None) -> InceptionConfig:
  """``num_classes`` from ``fc.weight`` (1008 for inception-2015-12-05); the input size is always 299."""
  pick_table(LAYOUTS, layout, "Inception")
  if diffusers_config is not None:
    raise ConversionError("an Inception state dict comes without a config.json; this source has one")
  fc = need(tensors, "fc.weight", "Inception")
  if len(fc.shape) != 2 or fc.shape[1] != 2048:
    raise ConversionError(f"fc.weight {tuple(fc.shape)} is not (num_classes, 2048)")
  return InceptionConfig(num_classes=int(fc.shape[0]))


def to_model(tensors, cfg: InceptionConfig, layout: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
             allow_nonfinite: bool = False) -> InceptionV3:
  """Apply the key table strictly and streaming (:func:`~dit_jax.convert.engine.apply_table`); the
  ``num_batches_tracked`` counters are left out first."""
  table = pick_table(LAYOUTS, layout, "Inception")
  abstract = nnx.eval_shape(lambda: InceptionV3(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
  return apply_table(select_inception_tensors(tensors), table(cfg), abstract, cfg, what=f"{layout} Inception",
                     ops=OPS, allow_nonfinite=allow_nonfinite)


def from_model(model: InceptionV3, layout: str) -> dict[str, np.ndarray]:
  """The model's parameters as a numpy state dict in the torch key names (inverse of the import)."""
  return export_table(model, pick_table(LAYOUTS, layout, "Inception")(model.config), OPS)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
  """Hex sha256 of a file, read ``chunk`` bytes at a time."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      digest.update(block)
  return digest.hexdigest()


def source_meta(src: str | os.PathLike, layout: str = "torch") -> dict[str, Any]:
  """Checkpoint metadata for a converted Inception file: its path, layout, dtype and sha256 (a folder: no sha256)."""
  meta: dict[str, Any] = {"path": str(src), "layout": layout, "dtype": "float32",
                          "description": "FID Inception-v3 (inception-2015-12-05), pytorch-fid / torch-fidelity"}
  if os.path.isfile(src):
    meta["sha256"] = file_sha256(src)
  return {"source": meta}
