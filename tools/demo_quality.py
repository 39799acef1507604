#!/usr/bin/env python
"""Quality check for the embedded digits demo: is each generated digit the class it was asked for?

Trains a classifier (an RBF SVM, about 99% held-out accuracy) on scikit-learn's real 8x8 digits, samples
``--per-class`` digits of every class from a trained checkpoint (the DiT demo, or the MMDiT / FLUX demos
conditioned on class tokens), and reports the fraction that the classifier assigns to the requested class. It also
reports the Fréchet distance of the samples to the held-out real digits on a small MLP classifier's hidden features
(the small-scale FID of dit_jax.eval.digits), beside the same distance for as many real training digits (its floor).

  python tools/demo_quality.py runs/demo [--per-class 50] [--method euler --steps 32 --cfg-scale 2.0]
  python tools/demo_quality.py runs/mmdit-demo --target 0.90
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from dit_jax.cli import ArgumentParser, fail  # noqa: E402
from dit_jax.eval.digits import (digits_classifier, digits_frechet_distance, feature_network,  # noqa: E402
                                 real_frechet_distance, to_digit_features)


def evaluate(checkpoint: str, per_class: int = 50, seed: int = 0, **sample_kwargs) -> dict:
  """Sample ``per_class`` digits of each class and classify them. A DiT is given the labels; an MMDiT or FLUX
  workdir trained on class tokens (configs/mmdit_demo.py, configs/flux_demo.py) is given each label's tokens as
  context / pooled, with classifier-free guidance against zeros (the sampler's default negative) and its training
  shift."""
  import jax

  import dit_jax
  from dit_jax import kinds
  from dit_jax.checkpoint import read_meta

  model = dit_jax.load(checkpoint)
  cfg = model.config
  labels = np.repeat(np.arange(10), per_class)
  if kinds.of(model).conditioning == "text":  # class tokens as context / pooled
    from dit_jax.workdir import class_tokens_of, sampling_shift

    tokens = class_tokens_of(checkpoint)
    flux = kinds.of(model).name == "flux"  # no fixed size (the digits' 8x8 goes as latent_size); packed channels
    shape = (8, cfg.in_channels // 4) if flux else (cfg.sample_size, cfg.in_channels)
    if (*shape, tokens.num_classes) != (8, 1, 10):
      raise ValueError(f"{checkpoint} is not a digits model (8x8x1, 10 classes)")
    if flux:
      sample_kwargs.setdefault("latent_size", (8, 8))
    sample_kwargs.setdefault("shift", sampling_shift(read_meta(checkpoint)["training"], 1.0))
    sample_kwargs.pop("flow_convention", None)
    cond = tokens(labels)
  else:
    if (cfg.input_size, cfg.in_channels, cfg.num_classes) != (8, 1, 10):
      raise ValueError(f"{checkpoint} is not a digits model (8x8x1, 10 classes)")
    cond = labels
  clf, real_accuracy = digits_classifier(seed)
  run = lambda: jax.device_get(dit_jax.sample(model, cond, jax.random.key(seed), **sample_kwargs))
  run()  # compile
  start = time.perf_counter()
  images = run()
  images_per_s = len(labels) / (time.perf_counter() - start)
  predicted = clf.predict(to_digit_features(images))
  per_class_acc = {int(c): float((predicted[labels == c] == c).mean()) for c in range(10)}
  return {"accuracy": float((predicted == labels).mean()), "per_class": per_class_acc,
          "classifier_accuracy_on_real": real_accuracy, "samples": int(len(labels)),
          "frechet_distance": digits_frechet_distance(images, seed),
          "frechet_distance_real": real_frechet_distance(len(labels), seed),
          "feature_classifier_accuracy_on_real": feature_network(seed).accuracy, "images_per_s": images_per_s}


def main(argv=None) -> int:
  p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("checkpoint")
  p.add_argument("--per-class", type=int, default=50)
  p.add_argument("--method", default="euler")
  p.add_argument("--steps", type=int, default=32)
  p.add_argument("--cfg-scale", type=float, default=2.0)
  p.add_argument("--guidance", type=float, default=None,
                 help="the guidance input of a guidance-distilled student (then --cfg-scale 1)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--target", type=float, default=0.95, help="exit 1 when the accuracy is below this")
  try:
    args = p.parse_args(argv)
  except SystemExit as e:  # --help, or a usage error already reported in one line
    return int(e.code or 0)
  try:
    extra = {"guidance": args.guidance} if args.guidance is not None else {}
    result = evaluate(args.checkpoint, args.per_class, args.seed, method=args.method, steps=args.steps,
                      cfg_scale=args.cfg_scale, **extra)
  except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
    return fail(e)
  print(json.dumps(result, indent=1))
  print(f"generated digits classified as the requested class: {result['accuracy']:.1%} "
        f"(classifier on real held-out digits: {result['classifier_accuracy_on_real']:.1%})")
  print(f"Fréchet distance to the held-out real digits on a digits classifier's features: "
        f"{result['frechet_distance']:.3f} (as many real training digits: {result['frechet_distance_real']:.3f})")
  return 0 if result["accuracy"] >= args.target else 1


if __name__ == "__main__":
  sys.exit(main())
