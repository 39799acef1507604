"""Conditioning for MMDiT training: precomputed text-embedding shards, and fixed class tokens for label datasets.

Text-embedding directory (row i belongs to item i of the latent or image source it is joined with)::

  manifest.json     {"format", "num_examples", "shard_size", "num_shards", "context_shape": [L, Dc],
                     "pooled_dim": Dp, "dtype"}
  text_00000.npz    uncompressed: context (n, L, Dc), pooled (n, Dp); shard k holds rows [k * shard_size, ...)

Class tokens give a label dataset the MMDiT's text interface: label y maps to a fixed context (L, Dc) and pooled
vector (Dp,) drawn once from ``default_rng(seed)`` (not learned), so the model only ever sees context / pooled.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from dit_jax.data.latents import npz_layout, npz_memmap

FORMAT = "dit_jax.text_embeddings/1"
MANIFEST = "manifest.json"


def shard_name(k: int) -> str:
  return f"text_{k:05d}.npz"


def write_text_embedding_shards(root: str | pathlib.Path, context: np.ndarray, pooled: np.ndarray,
                                shard_size: int = 4096) -> dict:
  """Write context (N, L, Dc) and pooled (N, Dp) as shards + manifest (each file written atomically, the manifest
  last); returns the manifest. Arrays keep their dtype (float16 halves the size)."""
  context, pooled = np.asarray(context), np.asarray(pooled)
  if context.ndim != 3 or pooled.ndim != 2:
    raise ValueError(f"context must be (N, L, Dc) and pooled (N, Dp), got {context.shape} and {pooled.shape}")
  if len(context) != len(pooled) or len(context) == 0:
    raise ValueError(f"context has {len(context)} rows and pooled {len(pooled)}; they must match and be > 0")
  if shard_size < 1:
    raise ValueError(f"shard_size must be positive, got {shard_size}")
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  n = len(context)
  num_shards = -(-n // shard_size)
  for k in range(num_shards):
    rows = slice(k * shard_size, (k + 1) * shard_size)
    tmp = root / f".{shard_name(k)}.tmp"
    with open(tmp, "wb") as f:
      np.savez(f, context=context[rows], pooled=pooled[rows])
    tmp.replace(root / shard_name(k))
  manifest = {"format": FORMAT, "num_examples": n, "shard_size": shard_size, "num_shards": num_shards,
              "context_shape": list(context.shape[1:]), "pooled_dim": int(pooled.shape[1]),
              "dtype": str(context.dtype)}
  tmp = root / f".{MANIFEST}.tmp"
  tmp.write_text(json.dumps(manifest, indent=1) + "\n")
  tmp.replace(root / MANIFEST)
  return manifest


class TextEmbeddings:
  """Random access over text-embedding shards: ``emb[i] -> {"context": (L, Dc), "pooled": (Dp,)}`` (float32).

  Every shard's row count and array shapes are checked against the manifest when opened (one-line errors)."""

  def __init__(self, root: str | pathlib.Path):
    self.root = pathlib.Path(root)
    path = self.root / MANIFEST
    if not path.exists():
      raise FileNotFoundError(f"{self.root} has no {MANIFEST}: not a text-embedding directory (write one with "
                              "write_text_embedding_shards)")
    m = self.manifest = json.loads(path.read_text())
    if m.get("format") != FORMAT:
      raise ValueError(f"{path} is not a {FORMAT} manifest (format {m.get('format')!r})")
    self.num_examples, self.shard_size = int(m["num_examples"]), int(m["shard_size"])
    self.context_shape = tuple(int(d) for d in m["context_shape"])
    self.pooled_dim = int(m["pooled_dim"])
    self.extra_shapes = {"context": self.context_shape, "pooled": (self.pooled_dim,)}
    self._shards: dict[int, dict] = {}
    for k in range(int(m["num_shards"])):
      self._shards[k] = self._open(k)

  def _open(self, k: int) -> dict[str, np.ndarray]:
    path = self.root / shard_name(k)
    if not path.exists():
      raise FileNotFoundError(f"text-embedding shard {path} is missing")
    arrays = npz_memmap(path, npz_layout(path))
    rows = min(self.shard_size, self.num_examples - k * self.shard_size)
    want = {"context": (rows, *self.context_shape), "pooled": (rows, self.pooled_dim)}
    for name, shape in want.items():
      got = arrays[name].shape if name in arrays else None
      if got != shape:
        raise ValueError(f"{path}: {name} has shape {got}, the manifest says {shape}")
    return arrays

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    if not 0 <= i < self.num_examples:
      raise IndexError(f"text embedding {i} out of range [0, {self.num_examples})")
    k, r = divmod(int(i), self.shard_size)
    s = self._shards[k]
    return {"context": np.asarray(s["context"][r], np.float32), "pooled": np.asarray(s["pooled"][r], np.float32)}

  def rows(self, n: int, start: int = 0) -> dict[str, np.ndarray]:
    """n rows from ``start`` (cycled) as a cond dict {"context": (n, L, Dc), "pooled": (n, Dp)} (e.g. for a
    sample grid)."""
    items = [self[i % self.num_examples] for i in range(start, start + n)]
    return {k: np.stack([it[k] for it in items]) for k in ("context", "pooled")}


class ClassTokens:
  """Label -> fixed conditioning: seeded standard normals, context (K, L, Dc) and pooled (K, Dp); class k draws
  from ``default_rng([seed, k])`` (context first), so its tokens do not depend on K."""

  def __init__(self, num_classes: int, length: int, context_dim: int, pooled_dim: int, seed: int = 0):
    if min(num_classes, length, context_dim, pooled_dim) < 1:
      raise ValueError(f"class tokens need positive sizes, got num_classes {num_classes}, length {length}, "
                       f"context_dim {context_dim}, pooled_dim {pooled_dim}")
    self.num_classes, self.seed = num_classes, seed
    context, pooled = [], []
    for k in range(num_classes):  # class k's tokens depend on (seed, k) only
      rng = np.random.default_rng([seed, k])
      context.append(rng.standard_normal((length, context_dim), np.float32))
      pooled.append(rng.standard_normal((pooled_dim,), np.float32))
    self.context, self.pooled = np.stack(context), np.stack(pooled)
    self.extra_shapes = {"context": (length, context_dim), "pooled": (pooled_dim,)}

  def spec(self) -> dict:
    """What rebuilds this table (stored in a training workdir's metadata)."""
    length, context_dim = self.extra_shapes["context"]
    return {"kind": "class_tokens", "num_classes": self.num_classes, "length": length, "context_dim": context_dim,
            "pooled_dim": self.extra_shapes["pooled"][0], "seed": self.seed}

  def __call__(self, labels) -> dict[str, np.ndarray]:
    """(B,) int labels in [0, K) -> {"context": (B, L, Dc), "pooled": (B, Dp)} float32."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"class labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    bad = labels[(labels < 0) | (labels >= self.num_classes)]
    if bad.size:
      raise ValueError(f"class id {int(bad[0])} is out of range 0..{self.num_classes - 1}")
    return {"context": self.context[labels], "pooled": self.pooled[labels]}


def class_tokens_from_spec(spec: dict) -> ClassTokens:
  """The ClassTokens that :meth:`ClassTokens.spec` describes."""
  return ClassTokens(spec["num_classes"], spec["length"], spec["context_dim"], spec["pooled_dim"], spec["seed"])


class ConditionedSource:
  """A source whose items also carry "context" and "pooled": from text-embedding row i, or from the item's label.

  Keeps the wrapped source's ``transform`` / ``item_shape`` / ``channels`` / ``num_classes``, so the Loader reads
  it like the source itself and adds the two arrays to each batch (``extra_shapes``)."""

  def __init__(self, source, cond: TextEmbeddings | ClassTokens):
    if isinstance(cond, TextEmbeddings) and len(cond) != len(source):
      raise ValueError(f"the text embeddings in {cond.root} have {len(cond)} rows but the data source has "
                       f"{len(source)} items; row i must belong to item i")
    if isinstance(cond, ClassTokens) and getattr(source, "num_classes", None) not in (None, cond.num_classes):
      raise ValueError(f"class tokens for {cond.num_classes} classes, but the source has {source.num_classes}")
    self.source, self.cond = source, cond
    self.extra_shapes = cond.extra_shapes
    for name in ("transform", "item_shape", "channels", "num_classes"):
      if hasattr(source, name):
        setattr(self, name, getattr(source, name))

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    item = dict(self.source[i])
    if isinstance(self.cond, TextEmbeddings):
      item.update(self.cond[i])
    else:
      c = self.cond(np.asarray([item["label"]]))
      item.update(context=c["context"][0], pooled=c["pooled"][0])
    return item
