"""Any TFDS image-classification dataset (features ``image`` and ``label``) as a random-access source.

Two read paths over a prepared dataset, neither needing TensorFlow:
- array_record (or parquet) preparations: ``builder.as_data_source``, TFDS's own random access.
- TFRecord preparations (TFDS's default): one pass over the record headers of the split's shards builds an index
  of (shard, offset, length), 20 bytes per example (26 MB for ImageNet's 1.28M; the pass reads only headers), and
  each read is then one ``pread``. Records are not CRC-checked; a damaged one fails to parse and counts as corrupt.
Either way the order is the stored one (shards in order, records in order, split slices such as ``train[:10%]``
honoured), as ``tfds.data_source`` gives it; TF's ``as_dataset`` interleaves shards, so its order differs.
Images are read as encoded bytes and decoded with PIL in ``__getitem__``, so a bad image raises CorruptImage.
Preparing a dataset (``manual_dir`` / ``download``) runs the TFDS builder, which usually needs TensorFlow.
"""
from __future__ import annotations

import logging
import os
import struct
import threading

import numpy as np

from dit_jax.data.sources import CorruptImage, decode_image
from dit_jax.data.transforms import to_channels

logger = logging.getLogger("dit_jax")


class TfdsSource:
  """``source[i] -> {"image": uint8 (H, W, C), "label": int}`` over a prepared TFDS split.

  A dataset that is not prepared in ``data_dir`` is prepared (as array_record, which needs TensorFlow for most
  builders) only when ``manual_dir`` is given (e.g. ``imagenet2012``: the directory holding ILSVRC2012_img_*.tar)
  or ``download=True``; otherwise the constructor raises. Prepare on one host before a multi-host run.
  """

  def __init__(self, name: str, split: str = "train", data_dir: str | None = None, manual_dir: str | None = None,
               download: bool = False, image_key: str = "image", label_key: str = "label"):
    import tensorflow_datasets as tfds

    self.name, self.split, self.image_key, self.label_key = name, split, image_key, label_key
    try:
      builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise FileNotFoundError(f"no TFDS dataset {name!r} (neither a TFDS builder nor prepared files in "
                              f"{data_dir or 'the default data_dir'!r})") from e
    if not builder.is_prepared():
      if not (manual_dir or download):
        raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared in {str(builder.data_dir_root)!r}; prepare it "
                                "(tfds build --file_format=array_record) or pass manual_dir / download=True")
      builder = tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
      try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir or None))
      except ModuleNotFoundError as e:  # TFDS builders need TensorFlow (and TFDS 4.9 importlib_resources) to prepare
        raise ModuleNotFoundError(f"preparing TFDS dataset {name!r} needs the module {e.name!r}: pip install "
                                  f"{'tensorflow-cpu' if e.name == 'tensorflow' else e.name}") from e
    features = builder.info.features
    missing = [k for k in (image_key, label_key) if k not in features]
    if missing:
      raise KeyError(f"TFDS dataset {name!r} has no feature {missing[0]!r} (features: {', '.join(features)})")
    self.num_classes = getattr(features[label_key], "num_classes", None)  # a ClassLabel's; None otherwise
    shape = getattr(features[image_key], "shape", (None,))
    self._declared = shape[-1] if shape and shape[-1] in (1, 3) else 0  # as TFDS decodes: grey JPEGs -> 3 channels
    self.channels = self._declared or 3
    formats = builder.info.available_file_formats()
    random_access = formats & tfds.core.FileFormat.with_random_access()
    if random_access:
      self.file_format = min(f.value for f in random_access)  # array_record before parquet
      self._records = builder.as_data_source(split, decoders={image_key: tfds.decode.SkipDecoding()},
                                             file_format=self.file_format)
      self._deserialize = None
    elif tfds.core.FileFormat.TFRECORD in formats:
      self.file_format = "tfrecord"
      self._records = TFRecordIndex(builder.info.splits[split].file_instructions)
      self._deserialize = lambda record: features.deserialize_example_np(
          record, decoders={image_key: tfds.decode.SkipDecoding()})
    else:
      raise NotImplementedError(f"TFDS dataset {name!r} is stored as {', '.join(f.value for f in formats)}; "
                                "need array_record, parquet or tfrecord")
    self._lock = threading.Lock()  # array_record readers are shared; PIL decoding happens outside the lock
    logger.info("TFDS %s[%s]: %d examples, %s classes, read via %s", name, split, len(self), self.num_classes,
                self.file_format)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> dict:
    from google.protobuf.message import DecodeError

    where = f"{self.name}[{self.split}] #{i}"
    try:
      with self._lock:
        example = self._records[int(i)]
      if self._deserialize is not None:
        example = self._deserialize(example)
      image, label = example[self.image_key], example[self.label_key]
      if image is None or label is None:
        raise ValueError(f"the record has no {self.image_key if image is None else self.label_key}")
    except (OSError, ValueError, KeyError, DecodeError) as e:  # an unreadable or unparsable record
      raise CorruptImage(f"{where}: {' '.join(str(e).split()) or type(e).__name__}") from e
    if isinstance(image, np.ndarray) and image.dtype != object:  # an undecoded uint8 tensor feature
      image = image.astype(np.uint8)[..., None] if image.ndim == 2 else image.astype(np.uint8)
    else:
      image = decode_image(bytes(image.item() if isinstance(image, np.ndarray) else image), where)
    return {"image": to_channels(image, self._declared), "label": int(label)}


class TFRecordIndex:
  """Random access into TFRecord shards: ``index[i] -> serialized record bytes``.

  Built from TFDS FileInstructions (filename, skip, take); a TFRecord is [u64 length][u32 crc][data][u32 crc].
  Shards are opened per read, so a 1024-shard split holds no file descriptors."""

  def __init__(self, file_instructions):
    self._paths, shard, offsets, lengths = [], [], [], []
    for k, fi in enumerate(file_instructions):
      path = os.fspath(fi.filename)
      self._paths.append(path)
      with open(path, "rb") as f:
        size, pos, n = os.fstat(f.fileno()).st_size, 0, 0
        while pos < size and n < fi.skip + fi.take:
          header = os.pread(f.fileno(), 8, pos)
          if len(header) < 8:
            raise OSError(f"truncated TFRecord header in {path} at byte {pos}")
          (length,) = struct.unpack("<Q", header)
          if n >= fi.skip:
            shard.append(k), offsets.append(pos + 12), lengths.append(length)
          pos += 16 + length
          n += 1
    self._shard = np.asarray(shard, np.int32)
    self._offsets = np.asarray(offsets, np.int64)
    self._lengths = np.asarray(lengths, np.int64)

  def __len__(self) -> int:
    return len(self._offsets)

  def __getitem__(self, i: int) -> bytes:
    length = int(self._lengths[i])
    with open(self._paths[self._shard[i]], "rb") as f:
      data = os.pread(f.fileno(), length, int(self._offsets[i]))
    if len(data) != length:
      raise OSError(f"truncated TFRecord (wanted {length} bytes, got {len(data)})")
    return data
