"""Safe readers for PyTorch checkpoints: ``.pt``/``.bin`` (weights_only), safetensors (single or sharded) and
diffusers model folders. Everything comes back as numpy arrays keyed by the source's own names."""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
from typing import Any

import numpy as np


class ConversionError(ValueError):
  """A user-facing conversion problem; the message is one line."""


@dataclasses.dataclass
class Source:
  tensors: dict[str, np.ndarray]
  description: str
  diffusers_config: dict[str, Any] | None = None


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _torch():
  try:
    import torch
  except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ConversionError("reading PyTorch files needs torch: pip install 'dit_jax[torch]'") from e
  return torch


def to_numpy(tensor) -> np.ndarray:
  """torch tensor -> numpy, keeping bf16 (as ml_dtypes.bfloat16) and every other dtype bit-exact."""
  torch = _torch()
  tensor = tensor.detach().cpu().contiguous()
  if tensor.dtype == torch.bfloat16:
    import ml_dtypes
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def from_numpy(array: np.ndarray):
  """numpy (incl. ml_dtypes.bfloat16) -> torch tensor, bit-exact."""
  torch = _torch()
  array = np.ascontiguousarray(array)
  if array.dtype.name == "bfloat16":
    return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(array)


def _sniff(path: pathlib.Path) -> str:
  """'zip' (torch >= 1.6), 'pickle' (legacy torch), 'safetensors' or 'unknown', from the first bytes."""
  with open(path, "rb") as f:
    head = f.read(16)
  if head.startswith(b"PK\x03\x04"):
    return "zip"
  if head[:1] == b"\x80":
    return "pickle"
  if len(head) >= 9 and head[8:9] == b"{":
    return "safetensors"
  return "unknown"


def _check_state_dict(obj: Any, where: str) -> dict[str, np.ndarray]:
  torch = _torch()
  if not isinstance(obj, dict) or not obj:
    raise ConversionError(f"{where} is not a state dict (got {type(obj).__name__})")
  bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
  if bad:
    raise ConversionError(f"{where} is not a plain tensor state dict: entry {bad[0]!r} is a "
                          f"{type(obj[bad[0]]).__name__}")
  return {k: to_numpy(v) for k, v in obj.items()}


def read_torch_file(path: pathlib.Path, weights: str | None = None) -> Source:
  """A ``torch.save`` file, loaded with ``weights_only=True`` (argparse.Namespace allowed for DiT's 'args').

  A plain state dict is returned as is. A training checkpoint ``{"model", "ema", ...}`` yields its EMA weights
  by default (``weights='ema'|'model'`` to choose).
  """
  torch = _torch()
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - any failure here is a bad file, reported in one line
    message = _first_line(e)
    if "Weights only load failed" in message or "Unsupported global" in str(e):
      raise ConversionError(f"{path} is not a plain tensor state dict; refusing to unpickle arbitrary objects "
                            "(torch.load weights_only=True rejected it)") from None
    raise ConversionError(f"{path} is truncated or not a PyTorch checkpoint ({message})") from None
  if isinstance(obj, dict) and ("ema" in obj or "model" in obj) and not all(
      isinstance(v, torch.Tensor) for v in obj.values()):
    choice = weights or ("ema" if "ema" in obj else "model")
    if choice not in obj:
      raise ConversionError(f"{path} has no {choice!r} weights (entries: {', '.join(map(str, obj))})")
    return Source(_check_state_dict(obj[choice], f"{path}[{choice!r}]"), f"{path} ({choice} weights)")
  if weights is not None:
    raise ConversionError(f"{path} is a plain state dict; --weights {weights} applies to training checkpoints only")
  return Source(_check_state_dict(obj, str(path)), str(path))


def read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors import safe_open
  try:
    with safe_open(str(path), framework="pt") as f:
      return {k: to_numpy(f.get_tensor(k)) for k in f.keys()}
  except Exception as e:  # noqa: BLE001
    raise ConversionError(f"{path} is truncated or not a safetensors file ({_first_line(e)})") from None


def _read_diffusers_folder(folder: pathlib.Path) -> Source:
  config_path = folder / "config.json"
  config = None
  if config_path.exists():
    try:
      config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
      raise ConversionError(f"{config_path} is not valid JSON ({e})") from None
  stem = "diffusion_pytorch_model"
  index = folder / f"{stem}.safetensors.index.json"
  if index.exists():
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
      tensors.update(read_safetensors(folder / shard))
  elif (folder / f"{stem}.safetensors").exists():
    tensors = read_safetensors(folder / f"{stem}.safetensors")
  elif (folder / f"{stem}.bin").exists():
    return Source(read_torch_file(folder / f"{stem}.bin").tensors, str(folder), config)
  else:
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) != 1:
      raise ConversionError(f"{folder} holds no diffusers weights ({stem}.safetensors / .bin)")
    tensors = read_safetensors(candidates[0])
  return Source(tensors, str(folder), config)


def read_source(src: str | pathlib.Path, weights: str | None = None) -> Source:
  """Read any supported source into numpy tensors.

  Args:
    src: a ``.pt``/``.pth``/``.bin`` file, a ``.safetensors`` file, a diffusers model folder, or a pipeline
      folder with a ``transformer/`` subfolder.
    weights: for training checkpoints, 'ema' (default when present) or 'model'.
  """
  path = pathlib.Path(src)
  if not path.exists():
    raise ConversionError(f"{path} does not exist")
  if path.is_dir():
    if weights is not None:
      raise ConversionError("--weights applies to training checkpoints (.pt) only")
    sub = path / "transformer"
    return _read_diffusers_folder(sub if sub.is_dir() else path)
  file_format = _sniff(path)
  if file_format == "safetensors":
    if weights is not None:
      raise ConversionError("--weights applies to training checkpoints (.pt) only")
    return Source(read_safetensors(path), str(path))
  if file_format in ("zip", "pickle"):
    return read_torch_file(path, weights)
  raise ConversionError(f"{path} is not a PyTorch checkpoint, safetensors file or diffusers folder")
