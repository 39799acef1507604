"""Safe readers for PyTorch checkpoints: ``.pt``/``.bin`` (weights_only), safetensors (single or sharded) and
diffusers model folders, keyed by the source's own names.

``read_source(src, lazy=True)`` streams: every tensor is a :class:`LazyTensor` (shape and dtype from the file's
header) that reads its values only when materialised, one at a time, so a conversion holds its output plus about
one source tensor. ``lazy=False`` (the default) gives numpy arrays (:func:`load_all`).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import struct
from typing import Any, Callable

import ml_dtypes
import numpy as np


class ConversionError(ValueError):
  """A user-facing conversion problem; the message is one line."""


@dataclasses.dataclass(frozen=True, eq=False)
class LazyTensor:
  """One tensor of a checkpoint file, read only when materialised (:meth:`numpy`, ``np.asarray``): ``shape``
  and ``dtype`` come from the file's header; every read returns a fresh array and nothing is cached."""
  shape: tuple[int, ...]
  dtype: np.dtype
  read: Callable[[], np.ndarray] = dataclasses.field(repr=False)
  where: str = ""  # 'file:key', for messages

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize

  def numpy(self) -> np.ndarray:
    return self.read()

  def __array__(self, dtype=None, copy=None):
    a = self.read()
    return a if dtype is None else a.astype(dtype, copy=False)

  def __getitem__(self, index):
    return self.read()[index]


Tensor = np.ndarray | LazyTensor


def materialise(tensor: Tensor) -> np.ndarray:
  """The values of a :class:`LazyTensor` (read now) or a numpy array (as is)."""
  return tensor.numpy() if isinstance(tensor, LazyTensor) else np.asarray(tensor)


def load_all(tensors: dict[str, Tensor]) -> dict[str, np.ndarray]:
  """Every tensor materialised: the eager behaviour (all source tensors in memory at once)."""
  return {k: materialise(v) for k, v in tensors.items()}


@dataclasses.dataclass
class Source:
  tensors: dict[str, Tensor]
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
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def from_numpy(array: np.ndarray):
  """numpy (incl. ml_dtypes.bfloat16) -> torch tensor, bit-exact."""
  torch = _torch()
  array = np.ascontiguousarray(array)
  if array.dtype.name == "bfloat16":
    return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(array)


def _torch_dtype(dtype, where: str) -> np.dtype:
  """The numpy dtype of a torch dtype (bf16 / float8 through ml_dtypes)."""
  torch = _torch()
  special = {torch.bfloat16: ml_dtypes.bfloat16, torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
             torch.float8_e5m2: ml_dtypes.float8_e5m2}
  if dtype in special:
    return np.dtype(special[dtype])
  try:
    return torch.empty((), dtype=dtype).numpy().dtype
  except (TypeError, RuntimeError):
    raise ConversionError(f"{where} has dtype {dtype}, which dit_jax cannot read") from None


def _lazy_torch(tensors: dict, where: str) -> dict[str, LazyTensor]:
  return {k: LazyTensor(tuple(t.shape), _torch_dtype(t.dtype, f"{where}: {k}"), functools.partial(to_numpy, t),
                        f"{where}:{k}") for k, t in tensors.items()}


def _sniff(path: pathlib.Path) -> str:
  """'zip' (torch >= 1.6), 'pickle' (legacy torch), 'safetensors' or 'unknown', from the first bytes."""
  with open(path, "rb") as f:
    head = f.read(16)
  if head.startswith(b"PK\x03\x04"):
    return "zip"
  if len(head) >= 9 and head[8:9] == b"{":  # before pickle: a header length of 128 + 256k also starts with 0x80
    return "safetensors"
  if head[:1] == b"\x80":
    return "pickle"
  return "unknown"


def _check_state_dict(obj: Any, where: str) -> dict[str, LazyTensor]:
  torch = _torch()
  if not isinstance(obj, dict) or not obj:
    raise ConversionError(f"{where} is not a state dict (got {type(obj).__name__})")
  bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
  if bad:
    raise ConversionError(f"{where} is not a plain tensor state dict: entry {bad[0]!r} is a "
                          f"{type(obj[bad[0]]).__name__}")
  return _lazy_torch(obj, where)


def read_torch_file(path: pathlib.Path, weights: str | None = None) -> Source:
  """A ``torch.save`` file, loaded with ``weights_only=True`` (argparse.Namespace allowed for DiT's 'args') and,
  for the zip format, memory-mapped (tensors are read when materialised).

  A plain state dict is returned as is. A training checkpoint ``{"model", "ema", ...}`` yields its EMA weights
  by default (``weights='ema'|'model'`` to choose).
  """
  torch = _torch()
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_sniff(path) == "zip")
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


# safetensors header dtype -> numpy dtype (bf16 / float8 through ml_dtypes).
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "C64": np.complex64,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


def _read_range(path: pathlib.Path, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
  """``shape`` values of ``dtype`` at byte ``offset`` of ``path``, read into a fresh array (no memory map, so
  only this tensor counts towards the process's memory)."""
  out = np.empty(shape, dtype)
  buf = memoryview(out.reshape(-1).view(np.uint8))
  with open(path, "rb", buffering=0) as f:
    f.seek(offset)
    done = 0
    while done < len(buf):
      n = f.readinto(buf[done:])
      if not n:
        raise ConversionError(f"{path} is truncated (it ended while reading a tensor)")
      done += n
  return out


def open_safetensors(path: pathlib.Path) -> dict[str, LazyTensor]:
  """A safetensors file's tensors as :class:`LazyTensor` s (checked by ``safetensors.safe_open``; the header's
  offsets say where each tensor's bytes are)."""
  from safetensors import safe_open
  try:
    with safe_open(str(path), framework="np") as f:
      keys = list(f.keys())
    with open(path, "rb") as f:
      (length,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(length))
  except Exception as e:  # noqa: BLE001
    raise ConversionError(f"{path} is truncated or not a safetensors file ({_first_line(e)})") from None
  out = {}
  for key in keys:
    info = header[key]
    if info["dtype"] not in SAFETENSORS_DTYPES:
      raise ConversionError(f"{path}: tensor {key} has dtype {info['dtype']}, which dit_jax cannot read")
    dtype, shape = np.dtype(SAFETENSORS_DTYPES[info["dtype"]]), tuple(info["shape"])
    read = functools.partial(_read_range, path, 8 + length + info["data_offsets"][0], dtype, shape)
    out[key] = LazyTensor(shape, dtype, read, f"{path}:{key}")
  return out


def read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Every tensor of a safetensors file as numpy (eager; :func:`open_safetensors` streams)."""
  return load_all(open_safetensors(path))


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConversionError(f"{path} is not valid JSON ({_first_line(e)})") from None


def _read_shards(folder: pathlib.Path, index: pathlib.Path) -> dict[str, LazyTensor]:
  """The tensors of a sharded safetensors model (``*.safetensors.index.json``); a key in two shards, a shard
  file that is absent or a key the index maps elsewhere is an error."""
  data = _read_json(index)
  weight_map = data.get("weight_map") if isinstance(data, dict) else None
  if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
    raise ConversionError(f"{index} has no weight_map of tensor name -> shard file")
  tensors: dict[str, LazyTensor] = {}
  for shard in sorted(set(weight_map.values())):
    if not (folder / shard).is_file():
      raise ConversionError(f"{index} names shard {shard}, which does not exist in {folder}")
    for key, value in open_safetensors(folder / shard).items():
      if key in tensors:
        raise ConversionError(f"tensor {key} is in two shards of {folder} ({weight_map.get(key)} and {shard})")
      tensors[key] = value
  misplaced = sorted(k for k in weight_map if k not in tensors)
  if misplaced:
    raise ConversionError(f"{index} maps {misplaced[0]} to {weight_map[misplaced[0]]}, which does not hold it")
  return tensors


def _read_diffusers_folder(folder: pathlib.Path) -> Source:
  config_path = folder / "config.json"
  config = None
  if config_path.exists():
    config = _read_json(config_path)
    if not isinstance(config, dict):
      raise ConversionError(f"{config_path} is not a JSON object (got {type(config).__name__})")
  stem = "diffusion_pytorch_model"
  index = folder / f"{stem}.safetensors.index.json"
  if index.exists():
    tensors = _read_shards(folder, index)
  elif (folder / f"{stem}.safetensors").exists():
    tensors = open_safetensors(folder / f"{stem}.safetensors")
  elif (folder / f"{stem}.bin").exists():
    return Source(read_torch_file(folder / f"{stem}.bin").tensors, str(folder), config)
  else:
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) != 1:
      raise ConversionError(f"{folder} holds no diffusers weights ({stem}.safetensors / .bin)")
    tensors = open_safetensors(candidates[0])
  return Source(tensors, str(folder), config)


def read_model_folder(folder: pathlib.Path) -> Source:
  """A transformers model folder (an SD3 pipeline's ``text_encoder*/``), lazily: config.json plus
  ``model.safetensors``, sharded ``model-0000i-of-0000n.safetensors`` with their index, the ``model.fp16``
  variant, or ``pytorch_model.bin``."""
  config = None
  if (folder / "config.json").exists():
    config = _read_json(folder / "config.json")
    if not isinstance(config, dict):
      raise ConversionError(f"{folder / 'config.json'} is not a JSON object (got {type(config).__name__})")
  for stem in ("model", "model.fp16"):
    if (folder / f"{stem}.safetensors.index.json").exists():
      return Source(_read_shards(folder, folder / f"{stem}.safetensors.index.json"), str(folder), config)
    if (folder / f"{stem}.safetensors").exists():
      return Source(open_safetensors(folder / f"{stem}.safetensors"), str(folder), config)
  if (folder / "pytorch_model.bin").exists():
    return Source(read_torch_file(folder / "pytorch_model.bin").tensors, str(folder), config)
  raise ConversionError(f"{folder} holds no transformers weights (model.safetensors, a sharded index or "
                        "pytorch_model.bin)")


def read_source(src: str | pathlib.Path, weights: str | None = None, *, lazy: bool = False) -> Source:
  """Read any supported source.

  Args:
    src: a ``.pt``/``.pth``/``.bin`` file, a ``.safetensors`` file, a diffusers model folder, or a pipeline
      folder with a ``transformer/`` subfolder.
    weights: for training checkpoints, 'ema' (default when present) or 'model'.
    lazy: :class:`LazyTensor` s, read one at a time by the conversion (streaming), instead of numpy arrays.
  """
  source = _read(pathlib.Path(src), weights)
  if not lazy:
    source.tensors = load_all(source.tensors)
  return source


def _read(path: pathlib.Path, weights: str | None) -> Source:
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
    return Source(open_safetensors(path), str(path))
  if file_format in ("zip", "pickle"):
    return read_torch_file(path, weights)
  raise ConversionError(f"{path} is not a PyTorch checkpoint, safetensors file or diffusers folder")
