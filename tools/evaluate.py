#!/usr/bin/env python
"""The ADM evaluator (openai/guided-diffusion evaluations/evaluator.py) in JAX: IS, FID, sFID, precision, recall.

  python tools/evaluate.py VIRTUAL_imagenet256_labeled.npz samples.npz --inception ckpt/inception
  python tools/evaluate.py ref.npz samples.npz.shards/ --json metrics.json     # sample.py's shards work too
  python tools/evaluate.py --make-reference data/imagenet/val ref.npz --image-size 256 --num 10000

REF_BATCH: ADM's reference batch (``arr_0`` images; ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` when given are the
statistics FID / sFID compare with). SAMPLE_BATCH: the ``.npz`` that ``sample.py`` writes (``arr_0`` uint8), or its
shard folder. --inception: a converted FID Inception (``tools/convert_torch.py pt_inception-2015-12-05-6726825d.pth
DIR``), default $DIT_JAX_INCEPTION. Prints ADM's own lines and writes the numbers as JSON (--json, default
SAMPLE_BATCH + .metrics.json). The sample features are cached beside the sample batch (``.inception.npz``), so an
interrupted run resumes. --make-reference writes a reference batch in ADM's format from an ImageFolder tree or a
TFDS dataset ('tfds:NAME[:SPLIT]'), centre-cropped as ADM / DiT do. Errors are one line with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from dit_jax.cli import ArgumentParser, fail  # noqa: E402



def parse_args(argv=None) -> argparse.Namespace:
  p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("ref_batch", help="reference batch .npz (or, with --make-reference, the images to take)")
  p.add_argument("sample_batch", help="sample batch .npz or shard folder (with --make-reference: the output .npz)")
  p.add_argument("--inception", default=None, help="converted Inception checkpoint (default $DIT_JAX_INCEPTION)")
  p.add_argument("--batch-size", type=int, default=64, help="images per Inception batch")
  p.add_argument("--json", default=None, help="where to write the numbers (default SAMPLE_BATCH.metrics.json)")
  p.add_argument("--no-cache", action="store_true", help="do not cache / resume the sample features")
  p.add_argument("--make-reference", action="store_true", help="write a reference batch from images")
  p.add_argument("--image-size", type=int, default=256, help="--make-reference: ADM centre crop size")
  p.add_argument("--num", type=int, default=10_000, help="--make-reference: images to take (file order)")
  return p.parse_args(argv)


def _progress(label: str):
  def report(done: int, total: int) -> None:
    print(f"\r{label}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)
  return report


def reference_images(source: str, image_size: int, num: int) -> np.ndarray:
  """The first ``num`` images of an ImageFolder tree or 'tfds:NAME[:SPLIT]', ADM centre-cropped, uint8."""
  from PIL import Image

  from dit_jax.data import FolderSource, TfdsSource, center_crop_arr

  if source.startswith("tfds:"):
    _, name, *split = source.split(":")
    src = TfdsSource(name, split=split[0] if split else "train")
  else:
    src = FolderSource(source)
  take = min(num, len(src))
  out = np.zeros((take, image_size, image_size, 3), np.uint8)
  for i in range(take):
    image = np.asarray(src[i]["image"], np.uint8)
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert("RGB")
    out[i] = np.asarray(center_crop_arr(pil, image_size))
  return out


def run(args: argparse.Namespace) -> str:
  from dit_jax.eval import evaluator

  if args.batch_size <= 0:
    raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
  if args.make_reference:
    if args.image_size <= 0 or args.num <= 1:
      raise ValueError(f"--image-size must be positive and --num at least 2, got {args.image_size}, {args.num}")
    out = pathlib.Path(args.sample_batch)
    if out.suffix != ".npz":
      raise ValueError(f"the reference batch to write must end in .npz, got {out.name}")
    images = reference_images(args.ref_batch, args.image_size, args.num)
    model = evaluator.load_inception(args.inception)
    evaluator.reference_from_images(model, images, args.batch_size).save(out)
    return f"wrote {out} ({len(images)} images with their pool3 / spatial statistics)"
  ref = evaluator.ReferenceBatch.load(args.ref_batch)
  sample = evaluator.read_images(args.sample_batch, "sample batch")
  model = evaluator.load_inception(args.inception)
  base = pathlib.Path(args.sample_batch)
  cache = None if args.no_cache else base.with_name(base.name + ".inception.npz")
  numbers = evaluator.evaluate(model, ref, sample, batch_size=args.batch_size, sample_cache=cache,
                               progress=_progress("Inception features"))
  print("Computing evaluations...")
  print("Inception Score:", numbers["inception_score"])
  print("FID:", numbers["fid"])
  print("sFID:", numbers["sfid"])
  print("Precision:", numbers["precision"])
  print("Recall:", numbers["recall"])
  out = pathlib.Path(args.json) if args.json else base.with_name(base.name + ".metrics.json")
  out.write_text(json.dumps(numbers, indent=2) + "\n")
  return f"wrote {out}"


def main(argv=None) -> int:
  try:
    args = parse_args(argv)
  except SystemExit as e:  # --help, or a usage error already reported in one line
    return int(e.code or 0)
  try:
    print(run(args), file=sys.stderr)
  except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
    return fail(e)
  return 0


if __name__ == "__main__":
  sys.exit(main())
