"""Data pipeline: ADM centre crop, sources (digits, folder, TFDS), and the loader's determinism, resume,
multi-host slicing and corrupt-item skipping. Every dataset is built here; nothing is downloaded."""
from __future__ import annotations

import io
import json
import logging
import shutil
import struct

import numpy as np
import pytest
from PIL import Image

from dit_jax import data


def take(loader, k):
  return [next(loader) for _ in range(k)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def one_line(excinfo) -> str:
  msg = str(excinfo.value)
  assert msg and "\n" not in msg, msg
  return msg


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing


def block_means(arr: np.ndarray) -> np.ndarray:
  """(H, W, ...) -> (H/2, W/2, ...) means of 2x2 blocks."""
  h, w = arr.shape[:2]
  return arr.reshape(h // 2, 2, w // 2, 2, *arr.shape[2:]).astype(np.float64).mean(axis=(1, 3))


def test_center_crop_hand_computed_box_path():
  """32 wide x 16 high -> 8: one BOX halving (16 >= 2 * 8) to 16x8, scale 1 (no resampling), crop x from 4."""
  rng = np.random.default_rng(0)
  blocks = rng.integers(0, 64, (8, 16, 3)) * 4
  within = np.tile(np.array([[0, 2], [2, 0]]), (8, 16))[..., None]  # PIL BOX is separable: integer row means too
  arr = (np.repeat(np.repeat(blocks, 2, 0), 2, 1) + within).astype(np.uint8)
  expected = block_means(arr.astype(np.float64))
  assert np.all(expected == np.round(expected))
  out = np.asarray(data.center_crop_arr(Image.fromarray(arr), 8))
  assert out.shape == (8, 8, 3)
  np.testing.assert_array_equal(out, expected[:, 4:12].astype(np.uint8))


@pytest.mark.parametrize("size,image_size,halved,resized,offset", [
    ((300, 200), 64, (150, 100), (96, 64), (16, 0)),     # one halving (200 >= 128), then 100 -> 64
    ((517, 300), 256, (517, 300), (441, 256), (92, 0)),  # no halving; 517 * 256 / 300 = 441.2 -> 441
    ((600, 1000), 128, (150, 250), (128, 213), (0, 42)),  # two halvings (1000x600 portrait), 150 -> 128
])
def test_center_crop_sizes_and_centre(size, image_size, halved, resized, offset):
  w, h = size
  ramp = np.add.outer(np.linspace(0, 120, h), np.linspace(0, 120, w))  # increases along both axes
  arr = np.stack([ramp, ramp[::-1], np.full_like(ramp, 7)], -1).astype(np.uint8)
  pil = Image.fromarray(arr)
  out = np.asarray(data.center_crop_arr(pil, image_size))
  assert out.shape == (image_size, image_size, 3)
  # The documented PIL calls: BOX halvings (floor sizes), one BICUBIC resize, centre crop.
  ref = pil
  while min(ref.size) >= 2 * image_size:
    ref = ref.resize((ref.width // 2, ref.height // 2), Image.BOX)
  assert ref.size == halved
  ref = ref.resize(resized, Image.BICUBIC)
  x0, y0 = offset
  np.testing.assert_array_equal(out, np.asarray(ref)[y0:y0 + image_size, x0:x0 + image_size])
  # Centred: a linear ramp keeps the centre value of the full image.
  full_centre = 60 + 60  # ramp value at the centre of the original image
  crop_centre = out[..., 0].astype(np.float64).mean()
  assert abs(crop_centre - full_centre) < 2.0


def test_preprocess_range_flip_channels():
  img = np.arange(64, dtype=np.uint8).reshape(4, 4, 4)[..., :3] * 4
  img[0, 0] = 0
  img[3, 3] = 255
  out = data.preprocess(img, 4, flip=False)
  assert out.dtype == np.float32 and out.shape == (4, 4, 3)
  np.testing.assert_array_equal(out, img.astype(np.float32) / np.float32(127.5) - 1)  # no crop at S x S
  assert out[0, 0, 0] == -1 and out[3, 3, 0] == 1
  np.testing.assert_array_equal(data.preprocess(img, 4, flip=True), out[:, ::-1])
  grey = img[..., :1]
  assert data.preprocess(grey, 4, False).shape == (4, 4, 1)
  np.testing.assert_array_equal(data.preprocess(grey, 4, False, channels=3), np.repeat(out[..., :1], 3, -1))
  luma = np.asarray(Image.fromarray(img).convert("L"))
  np.testing.assert_array_equal(data.preprocess(img, 4, False, channels=1)[..., 0], luma / np.float32(127.5) - 1)
  assert data.preprocess(grey, 2, False).shape == (2, 2, 1)  # grey through the PIL crop


# ---------------------------------------------------------------------------------------------------------------
# Sources


def test_digits_source():
  pytest.importorskip("sklearn")
  from sklearn.datasets import load_digits

  src = data.DigitsSource()
  assert len(src) == 1797 and data.num_classes_of(src) == 10 and src.channels == 1
  item = src[5]
  assert item["image"].shape == (8, 8, 1) and item["image"].dtype == np.uint8
  ref = load_digits()
  np.testing.assert_array_equal(item["image"][..., 0], np.round(ref.images[5] * 255 / 16).astype(np.uint8))
  assert item["label"] == ref.target[5]
  assert src.images.min() == 0 and src.images.max() == 255
  assert sorted(set(src.labels.tolist())) == list(range(10))


def png_bytes(arr: np.ndarray, fmt: str = "PNG") -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format=fmt)
  return buf.getvalue()


def make_folder(root, n_per_class=(5, 6), corrupt=("dog/bad.png",), size=(20, 14)):
  """root/{cat,dog}/NNN.{png,jpg} (even N: PNG) with random RGB images; ``corrupt`` files hold garbage bytes."""
  rng = np.random.default_rng(0)
  for name, n in zip(("dog", "cat"), n_per_class[::-1]):  # created out of order: ids come from sorting
    (root / name).mkdir(parents=True)
    for i in range(n):
      arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
      fmt = "PNG" if i % 2 == 0 else "JPEG"
      (root / name / f"{i:03d}.{'png' if fmt == 'PNG' else 'jpg'}").write_bytes(png_bytes(arr, fmt))
  (root / "cat" / "notes.txt").write_text("not an image")
  for rel in corrupt:
    (root / rel).write_bytes(b"\x89PNG garbage" + bytes(rng.integers(0, 256, 100, dtype=np.uint8)))
  return root


def test_folder_source_and_corrupt_file(tmp_path, caplog):
  root = make_folder(tmp_path / "imgs")
  src = data.FolderSource(root)
  assert src.classes == ["cat", "dog"] and data.num_classes_of(src) == 2
  assert len(src) == 12 and src.channels == 3  # 5 cats, 6 dogs and dog/bad.png
  assert src.labels[[0, 4, 5, 11]].tolist() == [0, 0, 1, 1] and src[5]["label"] == 1
  assert src[0]["image"].shape == (14, 20, 3)
  bad = src.paths.index(str(root / "dog" / "bad.png"))
  with pytest.raises(data.CorruptImage) as e:
    src[bad]
  assert "bad.png" in one_line(e)

  with caplog.at_level(logging.WARNING, logger="dit_jax"):
    loader = data.Loader(src, global_batch_size=4, seed=0, image_size=8, num_workers=2)
    batches = take(loader, 3 * loader.steps_per_epoch)  # 3 epochs of 3 batches
  assert all(b["image"].shape == (4, 8, 8, 3) and b["label"].shape == (4,) for b in batches)
  assert all(b["image"].dtype == np.float32 and b["label"].dtype == np.int32 for b in batches)
  # Every position of an epoch is served, so the one corrupt item is met (and skipped) once per epoch.
  assert loader.skipped == 3 == loader.get_state()["skipped"]
  logged = [r for r in caplog.records if "corrupt item" in r.getMessage()]
  assert len(logged) == 1 and f"item {bad}:" in logged[0].getMessage()


def test_folder_mostly_corrupt_raises(tmp_path):
  root = make_folder(tmp_path / "imgs", n_per_class=(2, 2), corrupt=("cat/000.png", "cat/001.jpg", "dog/000.png"))
  loader = data.Loader(data.FolderSource(root), global_batch_size=4, seed=0, image_size=8, num_workers=0)
  with pytest.raises(RuntimeError) as e:
    next(loader)
  assert "more than half" in one_line(e)


# ---------------------------------------------------------------------------------------------------------------
# Loader


@pytest.fixture(scope="module")
def digits():
  pytest.importorskip("sklearn")
  return data.DigitsSource()


def test_loader_order_is_the_documented_permutation(digits):
  g, seed = 100, 3
  loader = data.Loader(digits, global_batch_size=g, seed=seed, image_size=8, random_flip=False)
  n = len(digits)
  assert loader.steps_per_epoch == n // g
  batches = take(loader, loader.steps_per_epoch + 2)  # into epoch 1
  for e, b, batch in [(0, 0, batches[0]), (0, 16, batches[16]), (1, 0, batches[17]), (1, 1, batches[18])]:
    idx = np.random.default_rng([seed, e]).permutation(n)[b * g:(b + 1) * g]
    np.testing.assert_array_equal(batch["label"], digits.labels[idx])
    np.testing.assert_array_equal(batch["image"], digits.images[idx] / np.float32(127.5) - 1)
  assert loader.get_state() == {"epoch": 1, "position": 2 * g, "skipped": 0}
  unshuffled = data.Loader(digits, global_batch_size=g, seed=seed, image_size=8, shuffle=False, random_flip=False)
  np.testing.assert_array_equal(next(unshuffled)["label"], digits.labels[:g])


def test_loader_deterministic_and_seed_dependent(digits):
  kw = {"global_batch_size": 64, "image_size": 12, "random_flip": True}
  a = take(data.Loader(digits, seed=0, **kw), 30)  # crosses an epoch (28 batches)
  b = take(data.Loader(digits, seed=0, num_workers=0, prefetch=1, **kw), 30)
  assert_batches_equal(a, b)
  c = next(data.Loader(digits, seed=1, **kw))
  assert not np.array_equal(a[0]["label"], c["label"])
  assert a[0]["image"].shape == (64, 12, 12, 1)


def test_flips_depend_only_on_seed_epoch_index(digits):
  seed, g = 5, 32
  loader = data.Loader(digits, global_batch_size=g, seed=seed, image_size=8, random_flip=True)
  two_hosts = data.Loader(digits, global_batch_size=g, seed=seed, image_size=8, random_flip=True,
                          process_index=1, process_count=2)
  flips = [loader.flip(0, i) for i in range(len(digits))]
  assert flips == [two_hosts.flip(0, i) for i in range(len(digits))]
  assert 0.4 < np.mean(flips) < 0.6 and flips != [loader.flip(1, i) for i in range(len(digits))]
  batch = next(loader)
  idx = np.random.default_rng([seed, 0]).permutation(len(digits))[:g]
  for row, i in enumerate(idx):
    np.testing.assert_array_equal(batch["image"][row], data.preprocess(digits[i]["image"], 8, flips[i]))
  no_flip = data.Loader(digits, global_batch_size=g, seed=seed, image_size=8, random_flip=False)
  assert not any(no_flip.flip(0, i) for i in range(100))


def folder_loaders(root, process_count, **kw):
  src = data.FolderSource(root)
  return [data.Loader(src, process_index=p, process_count=process_count, **kw) for p in range(process_count)]


def test_multi_host_slices_make_the_single_host_batch(tmp_path):
  root = make_folder(tmp_path / "imgs", n_per_class=(9, 8), corrupt=("dog/bad.png", "cat/004.png"))
  kw = {"global_batch_size": 6, "seed": 7, "image_size": 8, "random_flip": True}
  (single,) = folder_loaders(root, 1, **kw)
  hosts = folder_loaders(root, 2, **kw)
  assert hosts[0].local_batch_size == 3
  for _ in range(8):  # 18 items: 3 batches an epoch; corrupt items are replaced by position
    want = next(single)
    parts = [next(h) for h in hosts]
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), want["image"])
    np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), want["label"])
  assert hosts[0].skipped + hosts[1].skipped == single.skipped > 0
  assert hosts[0].get_state()["position"] == single.get_state()["position"]


def test_resume_gives_the_same_batches(tmp_path):
  root = make_folder(tmp_path / "imgs", n_per_class=(9, 8), corrupt=("dog/bad.png",))
  kw = {"global_batch_size": 4, "seed": 11, "image_size": 8, "random_flip": True}
  (_, original) = folder_loaders(root, 2, **kw)
  take(original, 5)  # 18 items, 4 batches an epoch: resume inside epoch 1
  state = json.loads(json.dumps(original.get_state()))
  assert state["epoch"] == 1 and state["position"] == 4
  expected = take(original, 9)
  (_, restored) = folder_loaders(root, 2, **kw)
  next(restored)  # state is replaced, not added to
  restored.set_state(state)
  assert restored.get_state() == state
  assert_batches_equal(take(restored, 9), expected)
  assert restored.get_state() == original.get_state()


def test_partial_last_batch(digits):
  loader = data.Loader(digits, global_batch_size=1000, seed=0, image_size=8, drop_remainder=False,
                       process_index=1, process_count=2)
  assert [next(loader)["label"].shape for _ in range(3)] == [(500,), (399,), (500,)]  # 797 = 398 + 399
  assert loader.get_state() == {"epoch": 1, "position": 1000, "skipped": 0}


def test_errors_are_one_line(digits, tmp_path):
  cfg = data.default_data_config()
  cfg.source = "lmdb"
  with pytest.raises(ValueError) as e:
    data.make_loader(cfg, global_batch_size=8, seed=0)
  assert "digits, folder, tfds" in one_line(e)
  for kw in ({"global_batch_size": 6, "process_count": 4}, {"global_batch_size": 4000}, {"channels": 2}):
    kw = {"global_batch_size": 8, **kw}
    with pytest.raises(ValueError) as e:
      data.Loader(digits, seed=0, image_size=8, **kw)
    one_line(e)
  loader = data.Loader(digits, global_batch_size=8, seed=0, image_size=8)
  for bad in ({"epoch": 0}, {"epoch": 0, "position": 5000, "skipped": 0}, {"epoch": "x", "position": 0, "skipped": 0}):
    with pytest.raises(ValueError) as e:
      loader.set_state(bad)
    one_line(e)
  with pytest.raises(FileNotFoundError) as e:
    data.FolderSource(tmp_path / "missing")
  one_line(e)
  (tmp_path / "empty" / "a").mkdir(parents=True)
  with pytest.raises(FileNotFoundError) as e:
    data.FolderSource(tmp_path / "empty")
  one_line(e)


def test_make_loader_configs(tmp_path):
  pytest.importorskip("sklearn")
  cfg = data.default_data_config()
  assert (cfg.source, cfg.image_size, cfg.random_flip, cfg.channels) == ("digits", 8, False, 0)
  loader = data.make_loader(cfg, global_batch_size=16, seed=0, process_index=0, process_count=2)
  batch = next(loader)
  assert batch["image"].shape == (8, 8, 8, 1) and data.num_classes_of(loader) == 10
  cfg.update(source="folder", folder=str(make_folder(tmp_path / "imgs", corrupt=())), image_size=16, channels=1,
             random_flip=True)
  loader = data.make_loader(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1)
  assert next(loader)["image"].shape == (4, 16, 16, 1) and data.num_classes_of(loader) == 2


# ---------------------------------------------------------------------------------------------------------------
# TFDS: a tiny builder prepared locally as array_record, then rewritten as TFRecord shards


TFDS_NAME = "dit_jax_tiny_images"


def tiny_images(i: int) -> np.ndarray:
  return np.full((6 + i, 9 + i % 4, 3), (i * 20, 255 - i * 10, i), np.uint8)


def prepare_tiny_tfds(data_dir):
  tfds = pytest.importorskip("tensorflow_datasets")

  with tfds.core.registered.skip_registration():  # found from its files, as a fresh process would

    class DitJaxTinyImages(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")
      # A dotted module makes TFDS 4.9 look for its checksums with importlib_resources, which may be missing.
      __module__ = "dit_jax_tiny_images"

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(num_classes=4)}),
            disable_shuffling=True)  # stored in key order, so item i is example i

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(10), "test": self._generate_examples(3)}

      def _generate_examples(self, n):
        for i in range(n):  # encoded PNG bytes: no TensorFlow needed; item 7 is garbage
          yield i, {"image": b"not a png" if i == 7 else png_bytes(tiny_images(i)), "label": i % 4}

  DitJaxTinyImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
  return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> bytes:
  crc = crc32c(data)
  return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def as_tfrecord(src_dir, dst_dir, shard_lengths=(6, 4)):
  """Copy the prepared dataset, storing the train split as TFRecord shards (the test split is dropped), with
  record 8 replaced by bytes that are no tf.train.Example."""
  import tensorflow_datasets as tfds

  builder = tfds.builder(TFDS_NAME, data_dir=str(src_dir))
  raw = builder.as_data_source("train", deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  records = [raw[i] for i in range(len(raw))]
  records[8] = b"\xff\xff not an Example"
  version = dst_dir / TFDS_NAME / "1.0.0"
  version.mkdir(parents=True)
  shutil.copy(src_dir / TFDS_NAME / "1.0.0" / "features.json", version)
  info = json.loads((src_dir / TFDS_NAME / "1.0.0" / "dataset_info.json").read_text())
  info["fileFormat"] = "tfrecord"
  info["splits"] = [dict(s, shardLengths=[str(n) for n in shard_lengths]) for s in info["splits"] if s["name"] ==
                    "train"]
  (version / "dataset_info.json").write_text(json.dumps(info))
  start = 0
  for k, n in enumerate(shard_lengths):
    with open(version / f"{TFDS_NAME}-train.tfrecord-{k:05d}-of-{len(shard_lengths):05d}", "wb") as f:
      for rec in records[start:start + n]:
        length = struct.pack("<Q", len(rec))
        f.write(length + masked_crc(length) + rec + masked_crc(rec))
    start += n


@pytest.fixture(scope="module")
def tfds_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  prepare_tiny_tfds(root / "array_record")
  as_tfrecord(root / "array_record", root / "tfrecord")
  return root


@pytest.mark.parametrize("fmt", ["array_record", "tfrecord"])
def test_tfds_source_round_trip(tfds_dirs, fmt, caplog):
  src = data.TfdsSource(TFDS_NAME, split="train", data_dir=str(tfds_dirs / fmt))
  assert src.file_format == fmt and len(src) == 10 and data.num_classes_of(src) == 4 and src.channels == 3
  for i in (0, 5, 6, 9):  # 6 is the first record of the second TFRecord shard
    item = src[i]
    np.testing.assert_array_equal(item["image"], tiny_images(i))
    assert item["label"] == i % 4
  for bad in (7, 8) if fmt == "tfrecord" else (7,):  # 7: not a PNG; 8: not a record
    with pytest.raises(data.CorruptImage) as e:
      src[bad]
    assert f"{TFDS_NAME}[train] #{bad}" in one_line(e)
  sliced = data.TfdsSource(TFDS_NAME, split="train[4:9]", data_dir=str(tfds_dirs / fmt))
  assert len(sliced) == 5 and [sliced[i]["label"] for i in range(3)] == [0, 1, 2]  # items 4, 5, 6
  np.testing.assert_array_equal(sliced[2]["image"], tiny_images(6))

  cfg = data.default_data_config()
  cfg.update(source="tfds", name=TFDS_NAME, data_dir=str(tfds_dirs / fmt), image_size=8, random_flip=True)
  with caplog.at_level(logging.WARNING, logger="dit_jax"):
    loader = data.make_loader(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1)
    batches = take(loader, 6)
  assert all(b["image"].shape == (4, 8, 8, 3) for b in batches) and loader.skipped > 0


def test_tfds_missing_or_unprepared_is_one_line(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(FileNotFoundError) as e:
    data.TfdsSource(TFDS_NAME, data_dir=str(tmp_path))  # no builder class, no files
  assert "no TFDS dataset" in one_line(e)
  with pytest.raises(FileNotFoundError) as e:
    data.TfdsSource("mnist", data_dir=str(tmp_path))  # a TFDS builder, never prepared here: nothing is downloaded
  assert "not prepared" in one_line(e)
