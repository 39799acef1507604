#!/usr/bin/env python
"""The few-step table of the digits demos: the teacher at 32 Euler steps with CFG and at 1 / 2 / 4 Euler steps,
then each distilled student given, with the accuracy of tools/demo_quality.py's classifier on the requested digit,
the Fréchet distance on its feature network (against the held-out real digits) and images per second.

  python tools/distill_demo.py runs/demo --guidance runs/demo-guidance --meanflow runs/demo-meanflow \
      --ladd runs/demo-ladd
  python tools/distill_demo.py runs/demo --meanflow runs/demo-meanflow --target meanflow-1=0.90

Prints a markdown table (and --json FILE); ``--target ROW=ACC`` exits 1 when that row's accuracy is below ACC.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dit_jax.cli import ArgumentParser, fail  # noqa: E402

CFG = 2.0  # the demo's guidance scale (configs/demo.py's sample grid, demo.sh)


def rows(args) -> list[tuple[str, str, str, dict]]:
  """(row id, model, sampling, demo_quality options) for every row the given checkpoints allow."""
  out = [("teacher-32", args.teacher, f"Euler 32 steps, CFG {CFG}", dict(method="euler", steps=32, cfg_scale=CFG))]
  out += [(f"teacher-{n}", args.teacher, f"Euler {n} step{'s' * (n > 1)}, CFG {CFG}",
           dict(method="euler", steps=n, cfg_scale=CFG)) for n in (1, 2, 4)]
  if args.guidance:
    out.append(("guidance-32", args.guidance, f"Euler 32 steps, guidance input {CFG} (one call per step)",
                dict(method="euler", steps=32, cfg_scale=1.0, guidance=CFG)))
  if args.meanflow:
    out += [(f"meanflow-{n}", args.meanflow, f"MeanFlow {n} step{'s' * (n > 1)}",
             dict(method="meanflow", steps=n, cfg_scale=1.0)) for n in (1, 2)]
  if args.ladd:
    out += [(f"ladd-{n}", args.ladd, f"few-step {n} step{'s' * (n > 1)}, no guidance",
             dict(method="few_step", steps=n, cfg_scale=1.0)) for n in (1, 2, 4)]
  return out


def main(argv=None) -> int:
  p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("teacher", help="the demo teacher's workdir (configs/demo.py)")
  p.add_argument("--guidance", help="a guidance-distilled student (configs/distill_guidance_demo.py)")
  p.add_argument("--meanflow", help="a MeanFlow student (configs/meanflow_demo.py)")
  p.add_argument("--ladd", help="a LADD student (configs/ladd_demo.py)")
  p.add_argument("--per-class", type=int, default=50)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="also write the rows as JSON")
  p.add_argument("--target", action="append", default=[], metavar="ROW=ACC",
                 help="exit 1 when ROW's accuracy is below ACC (e.g. meanflow-1=0.90); repeatable")
  try:
    args = p.parse_args(argv)
  except SystemExit as e:
    return int(e.code or 0)
  import demo_quality  # tools/ is on sys.path when this file runs as a script

  try:
    targets = {}
    for item in args.target:
      row, sep, value = item.partition("=")
      if not sep:
        raise ValueError(f"--target {item!r} is not ROW=ACC")
      targets[row] = float(value)
    table = rows(args)
    unknown = set(targets) - {r[0] for r in table}
    if unknown:
      raise ValueError(f"--target names rows that are not in the table: {', '.join(sorted(unknown))}")
    results = []
    for row, path, sampling, options in table:
      r = demo_quality.evaluate(path, args.per_class, args.seed, **options)
      results.append({"row": row, "model": path, "sampling": sampling, **r})
      print(f"{row}: accuracy {r['accuracy']:.1%}, Fréchet distance {r['frechet_distance']:.3f}, "
            f"{r['images_per_s']:.0f} images/s", file=sys.stderr)
  except (ValueError, FileNotFoundError) as e:
    return fail(e)
  floor = results[0]["frechet_distance_real"]
  print(f"| model | sampling | accuracy | Fréchet distance (real digits: {floor:.2f}) | images/s |")
  print("|---|---|---|---|---|")
  for r in results:
    print(f"| {r['row'].split('-')[0]} | {r['sampling']} | {r['accuracy']:.1%} | {r['frechet_distance']:.2f} | "
          f"{r['images_per_s']:.0f} |")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
  failed = [f"{row} {res['accuracy']:.1%} < {targets[row]:.1%}" for res in results
            for row in [res["row"]] if row in targets and res["accuracy"] < targets[row]]
  if failed:
    print("below target: " + "; ".join(failed), file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
  sys.exit(main())
