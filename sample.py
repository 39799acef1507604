#!/usr/bin/env python
"""Sample from a dit_jax checkpoint: a PNG grid of chosen classes, or N samples as an ADM-evaluator .npz; for an
MMDiT (SD3 / SD3.5) or a FLUX.1 model, one sample per prompt (with the text encoders bundled by
tools/convert_torch.py) or per row of precomputed text embeddings.

  python sample.py --checkpoint ckpt/dit-xl2-256 --class-labels 207,360,387,974 --method ddpm --steps 250 \\
      --cfg-scale 4.0 --seed 0 --out grid.png
  python sample.py --checkpoint ckpt/dit-xl2-256 --num-samples 50000 --batch-size 64 --cfg-scale 1.5 \\
      --cfg-mode dit --out samples.npz        # resumable: re-run the same command after an interruption
  python sample.py --checkpoint ckpt/sd3.5-medium --prompt "a corgi in a spacesuit" --preset sd35_medium --out a.png
  python sample.py --checkpoint ckpt/sd3.5-medium --prompts prompts.txt --batch-size 4 --out samples.npz
  python sample.py --checkpoint ckpt/sd3.5-medium --cond cond.npz --preset sd35_medium --latent-size 128,96 \
      --out grid.png                          # or --out samples.npz (arr_0 uint8 images + float32 latents)
  python sample.py --checkpoint ckpt/flux1-schnell --cond cond.npz --preset flux_schnell --latent-size 96,170 \
      --out grid.png                          # flux_dev: --guidance overrides the preset's 3.5
  python sample.py --checkpoint ckpt/flux1-schnell --prompt "a corgi in a spacesuit" --preset flux_schnell \
      --max-sequence-length 256 --out a.png   # BFL runs schnell with 256 T5 tokens; default 512 (FluxPipeline)

MMDiT / FLUX: cond.npz holds ``context`` (B, L, joint_attention_dim) and ``pooled`` (B, pooled_projection_dim),
and optionally ``negative_context`` / ``negative_pooled`` (1 or B rows; default zeros). ``--preset`` (a name in
configs/sampling/, NAME:FLAVOUR such as sd35_medium:diffusers or flux_dev:reference, or a .py path) sets method,
steps, shift, CFG, skip-layer guidance and (FLUX) the guidance input and schedule; explicit flags override it.
FLUX: --cfg-scale > 1 with a negative is diffusers' true CFG (off by default; from prompts the negative prompt is
encoded only then, default "").

Latents are decoded through the checkpoint's bundled VAE (tools/convert_torch.py bundles a pipeline's vae/ or
--vae SRC), or --vae DIR. Without one the model's own space is written (for 4-channel latents the PNG shows the
first three channels). User errors are reported in one line with exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # before TensorFlow (clu, data) loads: no C++ start-up lines

import numpy as np  # noqa: E402

from dit_jax.cli import ArgumentParser, fail  # noqa: E402
from dit_jax.diffusion.samplers import DEFAULT_STEPS, METHODS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="dit_jax checkpoint directory")
  p.add_argument("--out", required=True, help="grid .png, or .npz with --num-samples")
  p.add_argument("--class-labels", default=None, help="comma-separated class ids (default for .npz: uniform random)")
  p.add_argument("--num-samples", type=int, default=None, help="write this many samples to an .npz")
  p.add_argument("--batch-size", type=int, default=32, help="samples per batch (and per shard) for .npz")
  p.add_argument("--cond", default=None, help="MMDiT / FLUX: .npz of text embeddings (context, pooled[, "
                 "negative_*])")
  p.add_argument("--prompt", action="append", default=None, help="MMDiT / FLUX: a prompt (repeatable; needs "
                 "bundled text encoders)")
  p.add_argument("--prompts", default=None, help="MMDiT / FLUX: a text file of prompts, one per "
                 "line")
  p.add_argument("--negative-prompt", default=None, help="MMDiT / FLUX: the negative prompt (default "
                 "empty; FLUX: used with --cfg-scale > 1 only)")
  p.add_argument("--profile", default=None, choices=["diffusers", "sd35_reference"],
                 help="MMDiT prompt encoding: diffusers' StableDiffusion3Pipeline (default) or Stability's "
                      "sd3_infer.py")
  p.add_argument("--max-sequence-length", type=int, default=None, help="MMDiT / FLUX: T5 tokens (MMDiT: "
                 "diffusers profile, default 256; FLUX: default 512; at most 512)")
  p.add_argument("--latent-size", default=None, help="MMDiT / FLUX: H,W in latent pixels (default: the sample size; "
                 "FLUX 128,128)")
  p.add_argument("--preset", default=None, help="sampling preset: NAME[:FLAVOUR] in configs/sampling, "
                 "or a .py")
  p.add_argument("--guidance", type=float, default=None, help="the guidance input of a guidance-distilled model "
                 "(FLUX.1 [dev]: default 3.5; a guidance-distilled DiT: default --cfg-scale, sampled with one call "
                 "per step)")
  p.add_argument("--schedule", default=None, choices=["reference", "diffusers"],
                 help="FLUX: BFL's get_schedule or FluxPipeline's (default: the preset's, else diffusers)")
  p.add_argument("--method", default=None, help=f"one of {', '.join(METHODS)} (default: ddpm; euler for an MMDiT)")
  p.add_argument("--steps", type=int, default=None, help=f"sampling steps (defaults: {DEFAULT_STEPS})")
  p.add_argument("--respacing", default=None, help="VP respacing: 'N', 'a,b,c' or 'ddimN' (overrides --steps)")
  p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (1 = off; default 4)")
  p.add_argument("--cfg-mode", default="all", choices=["all", "dit"],
                 help="'dit' guides only the first 3 channels, as the original DiT (FID 2.27 at 1.5)")
  p.add_argument("--guidance-interval", default=None, help="lo,hi noise levels in [0,1] where CFG applies")
  p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
  p.add_argument("--shift", type=float, default=None, help="flow sigma shift (default 1; 3 for an MMDiT)")
  p.add_argument("--flow-convention", default=None, choices=["sit", "sd3"], help="DiT flow convention (default sit)")
  p.add_argument("--slg-layers", default=None, help="MMDiT skip-layer guidance: comma-separated blocks (e.g. 7,8,9)")
  p.add_argument("--slg-scale", type=float, default=None, help="skip-layer guidance scale (0 turns it off)")
  p.add_argument("--slg-start", type=float, default=None, help="skip-layer guidance window start (fraction of steps)")
  p.add_argument("--slg-stop", type=float, default=None, help="skip-layer guidance window stop (fraction of steps)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--nrow", type=int, default=None, help="images per grid row")
  p.add_argument("--zoom", type=int, default=1, help="enlarge each image by this factor in the PNG (nearest)")
  p.add_argument("--bf16", action="store_true", help="bf16 compute")
  p.add_argument("--keep-shards", action="store_true", help="keep per-batch shards after writing the .npz")
  p.add_argument("--vae", default=None, help="VAE checkpoint to decode with (default: the checkpoint's bundled vae/)")
  p.add_argument("--no-vae", action="store_true", help="write the model's latent space even if a VAE is bundled")
  return p.parse_args(argv)


def _ints(text: str, what: str) -> np.ndarray:
  try:
    return np.array([int(v) for v in text.split(",") if v.strip()], dtype=np.int64)
  except ValueError:
    raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None


def check_numbers(args: argparse.Namespace) -> None:
  """Reject numeric flags that make no sense (they would sample garbage), before anything is loaded or written."""
  for flag in ("steps", "num_samples", "batch_size", "zoom", "nrow"):
    value = getattr(args, flag)
    if value is not None and value < 1:
      raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
  if args.shift is not None and not (math.isfinite(args.shift) and args.shift > 0):
    raise ValueError(f"--shift must be a positive number, got {args.shift:g}")
  if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
    raise ValueError(f"--guidance must be a number >= 0, got {args.guidance:g}")
  for flag in ("cfg_scale", "eta", "slg_scale"):
    value = getattr(args, flag)
    if value is not None and not (math.isfinite(value) and value >= 0):
      raise ValueError(f"--{flag.replace('_', '-')} must be a number >= 0, got {value:g}")
  for flag in ("slg_start", "slg_stop"):
    value = getattr(args, flag)
    if value is not None and not 0 <= value <= 1:
      raise ValueError(f"--{flag.replace('_', '-')} must be a fraction of the steps in [0, 1], got {value:g}")
  guidance_interval(args.guidance_interval)


def guidance_interval(text: str | None) -> tuple[float, float] | None:
  """--guidance-interval 'lo,hi' -> (lo, hi) with 0 <= lo < hi <= 1."""
  if text is None:
    return None
  try:
    lo, hi = (float(v) for v in text.split(","))
  except ValueError:
    raise ValueError(f"--guidance-interval takes two numbers lo,hi in [0, 1], got {text!r}") from None
  if not 0 <= lo < hi <= 1:
    raise ValueError(f"--guidance-interval needs 0 <= lo < hi <= 1, got {text!r}")
  return lo, hi


MMDIT_FLAGS = ("cond", "prompt", "prompts", "negative_prompt", "profile", "max_sequence_length", "latent_size", "preset",
               "slg_layers", "slg_scale", "slg_start", "slg_stop", "schedule")
COND_KEYS = {"context": "context", "pooled": "pooled", "negative_context": "context", "negative_pooled": "pooled"}


def _decoder(args, dtype):
  import dit_jax
  from dit_jax import sample_files

  bundled = pathlib.Path(args.checkpoint) / "vae"
  vae_dir = args.vae or (bundled if bundled.is_dir() else None)
  if vae_dir is None or args.no_vae:
    return None
  return sample_files.vae_decoder(dit_jax.load_vae(vae_dir, dtype=dtype))


def run(args: argparse.Namespace) -> str:
  from dit_jax import kinds
  from dit_jax.checkpoint import read_meta

  out = pathlib.Path(args.out)
  if out.suffix not in (".png", ".npz"):
    raise ValueError(f"--out must end in .png or .npz, got {out.name}")
  check_numbers(args)
  if args.method is not None and args.method not in METHODS:
    raise ValueError(f"unknown method {args.method!r}; choose one of {', '.join(METHODS)}")
  kind = kinds.get(read_meta(args.checkpoint)["kind"])
  if kind.conditioning not in RUNNERS:
    raise ValueError(f"{args.checkpoint} is a {kind.name} checkpoint, not a diffusion model")
  return RUNNERS[kind.conditioning](args, out)


DISTILLED_METHODS = {"meanflow": "meanflow", "guidance_distill": "euler", "ladd": "few_step"}  # training objective -> default method


def _objective(checkpoint: str) -> str | None:
  """The objective a training workdir was trained with (None for a converted checkpoint)."""
  from dit_jax.checkpoint import read_meta

  return read_meta(checkpoint).get("training", {}).get("objective")


def run_labels(args: argparse.Namespace, out: pathlib.Path) -> str:
  """A class-conditional model (DiT): a grid of --class-labels, or --num-samples into a resumable .npz."""
  given = [f"--{name.replace('_', '-')}" for name in MMDIT_FLAGS if getattr(args, name) is not None and name != "preset"]
  if given:
    raise ValueError(f"{given[0]} is for MMDiT checkpoints; a DiT is sampled from --class-labels")
  import jax.numpy as jnp

  import dit_jax
  from dit_jax import sample_files

  if (out.suffix == ".npz") != (args.num_samples is not None):
    raise ValueError("--num-samples goes with an .npz output (and a .png grid takes --class-labels)")
  labels = _ints(args.class_labels, "--class-labels") if args.class_labels else None
  if out.suffix == ".png" and labels is None:
    raise ValueError("--class-labels is required for a PNG grid")
  interval = guidance_interval(args.guidance_interval)
  dtype = jnp.bfloat16 if args.bf16 else jnp.float32
  model = dit_jax.load(args.checkpoint, dtype=dtype)
  decode = _decoder(args, dtype)
  if labels is not None:
    from dit_jax.kinds.dit import check_labels
    check_labels(labels, model.config.num_classes)
  preset = _class_preset(args)
  cfg_scale = next(v for v in (args.cfg_scale, preset.get("cfg_scale"), 4.0) if v is not None)
  guidance = args.guidance if args.guidance is not None else preset.get("guidance")
  kw = dict(method=args.method or preset.get("method") or DISTILLED_METHODS.get(_objective(args.checkpoint), "ddpm"),
            steps=args.steps or preset.get("steps"), respacing=args.respacing, cfg_scale=cfg_scale,
            cfg_mode=args.cfg_mode, guidance_interval=interval, eta=args.eta,
            shift=next(v for v in (args.shift, preset.get("shift"), 1.0) if v is not None),
            flow_convention=args.flow_convention or "sit")
  if getattr(model.config, "guidance_embed", False):  # guidance-distilled: the scale is an input, one call per step
    kw.update(guidance=cfg_scale if guidance is None else guidance, cfg_scale=1.0)
  elif guidance is not None:
    raise ValueError("--guidance is the input of a guidance-distilled model (or FLUX.1 [dev]); this DiT is guided "
                     "with --cfg-scale")
  out.parent.mkdir(parents=True, exist_ok=True)
  if out.suffix == ".png":
    images = sample_files.generate_batch(model, labels, args.seed, 0, decode, **kw)
    images = sample_files.displayable(images).repeat(args.zoom, axis=1).repeat(args.zoom, axis=2)
    sample_files.save_png(out, sample_files.image_grid(images, args.nrow))
    return f"wrote {out} ({len(labels)} samples)"
  sample_files.sample_to_npz(model, out, args.num_samples, args.batch_size, args.seed, labels=labels, decode=decode,
                         keep_shards=args.keep_shards, **kw)
  return f"wrote {out} ({args.num_samples} samples)"


def _class_preset(args: argparse.Namespace) -> dict:
  """--preset for a DiT (e.g. digits_students:ladd): method, steps, cfg_scale, shift, guidance; {} without one. A
  preset with skip-layer guidance or a FLUX schedule is for MMDiT / FLUX models."""
  if not args.preset:
    return {}
  from dit_jax.presets import load_preset

  preset = load_preset(args.preset)
  if preset.skip_layer_guidance is not None or preset.schedule is not None:
    raise ValueError(f"--preset {args.preset} is for MMDiT / FLUX models (skip-layer guidance or a FLUX schedule)")
  return {k: preset[k] for k in ("method", "steps", "cfg_scale", "shift", "guidance")}


def read_cond(path: str) -> tuple[dict, dict | None]:
  """cond.npz -> (cond, negative or None) mappings of context / pooled arrays."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"--cond file {path} not found")
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {k: data[k] for k in data.files}
  except (OSError, ValueError) as e:
    raise ValueError(f"--cond {path.name} is not a readable .npz ({str(e).splitlines()[0]})") from None
  unknown = sorted(set(arrays) - set(COND_KEYS))
  missing = [k for k in ("context", "pooled") if k not in arrays]
  if missing or unknown:
    raise ValueError(f"--cond {path.name} needs arrays context and pooled (optional negative_context, "
                     f"negative_pooled): missing {', '.join(missing) or 'none'}, "
                     f"unexpected {', '.join(unknown) or 'none'}")
  negatives = [k for k in ("negative_context", "negative_pooled") if k in arrays]
  if len(negatives) == 1:
    raise ValueError(f"--cond {path.name} has {negatives[0]} without its partner; give both negative arrays or none")
  cond = {COND_KEYS[k]: arrays[k] for k in ("context", "pooled")}
  negative = {COND_KEYS[k]: arrays[k] for k in negatives} or None
  return cond, negative


def sampling_options(args: argparse.Namespace, default_shift: float | None = 3.0, default_cfg: float = 4.0) -> dict:
  """Method, steps, shift, CFG, skip-layer guidance and (FLUX) guidance input and schedule for an MMDiT or a FLUX
  model: defaults (shift: a training run's own; FLUX: None, the kind's resolution rule) < --preset < explicit
  flags."""
  from dit_jax.presets import load_preset

  opts = dict(method="euler", steps=None, shift=default_shift, cfg_scale=default_cfg, skip_layer_guidance=None,
              guidance=None, schedule=None)
  if args.preset:
    preset = load_preset(args.preset)
    opts.update({k: preset[k] for k in opts})
    if opts["skip_layer_guidance"] is not None:
      opts["skip_layer_guidance"] = opts["skip_layer_guidance"].to_dict()
  for key, value in (("method", args.method), ("steps", args.steps), ("shift", args.shift),
                     ("cfg_scale", args.cfg_scale), ("guidance", args.guidance), ("schedule", args.schedule)):
    if value is not None:
      opts[key] = value
  slg = dict(opts["skip_layer_guidance"] or {})
  if args.slg_layers is not None:
    slg["layers"] = [int(v) for v in _ints(args.slg_layers, "--slg-layers")]
  for key in ("scale", "start", "stop"):
    if getattr(args, f"slg_{key}") is not None:
      slg[key] = getattr(args, f"slg_{key}")
  if slg and ("layers" not in slg or "scale" not in slg):
    raise ValueError("skip-layer guidance needs --slg-layers and --slg-scale (or a preset that sets them)")
  if slg:
    from dit_jax.diffusion.guidance import SkipLayerGuidance
    window = SkipLayerGuidance.parse(slg)
    if not window.start < window.stop:
      raise ValueError(f"skip-layer guidance needs --slg-start < --slg-stop, got {window.start:g} and {window.stop:g}")
  opts["skip_layer_guidance"] = slg if slg and slg["scale"] != 0 else None
  return opts


def run_text(args: argparse.Namespace, out: pathlib.Path) -> str:
  """A text-conditional model (MMDiT, FLUX): one sample per prompt or per row of --cond embeddings (or per
  class-token label)."""
  import jax
  import jax.numpy as jnp

  import dit_jax
  from dit_jax import sample_files
  from dit_jax.checkpoint import read_meta
  from dit_jax import kinds
  from dit_jax.kinds.mmdit import check_text_cond

  for flag, value in (("--num-samples", args.num_samples), ("--respacing", args.respacing),
                      ("--guidance-interval", args.guidance_interval)):
    if value is not None:
      raise ValueError(f"{flag} is not for a text-conditioned checkpoint (sample from prompts with --prompt or from "
                       "text embeddings with --cond)")
  kind = kinds.get(read_meta(args.checkpoint)["kind"])
  name = "a FLUX" if kind.name == "flux" else "an MMDiT"
  if args.flow_convention not in (None, "sd3") or (kind.name == "flux" and args.flow_convention is not None):
    raise ValueError(f"--flow-convention is fixed for {name} checkpoint ({'flux' if kind.name == 'flux' else 'sd3'})")
  sources = [f for f, v in (("--cond", args.cond), ("--class-labels", args.class_labels), ("--prompt", args.prompt),
                             ("--prompts", args.prompts)) if v is not None]
  if len(sources) != 1:
    raise ValueError(f"{name} checkpoint needs --prompt TEXT / --prompts FILE, --cond cond.npz (context (B, L, D) "
                     "and pooled (B, Dp) arrays), or --class-labels for a run trained on class tokens; give exactly "
                     f"one{' (got ' + ', '.join(sources) + ')' if sources else ''}")
  text_flags = [f"--{n.replace('_', '-')}" for n in ("negative_prompt", "profile", "max_sequence_length")
                if getattr(args, n) is not None]
  if text_flags and sources[0] not in ("--prompt", "--prompts"):
    raise ValueError(f"{text_flags[0]} goes with --prompt / --prompts")
  training = read_meta(args.checkpoint).get("training", {})
  prompts = read_prompts(args)
  if prompts is not None and kind.name == "flux" and args.profile is not None:
    raise ValueError("--profile is for MMDiT checkpoints: FLUX encodes prompts as FluxPipeline does")
  if prompts is not None:
    cond, negative = None, None
  elif args.cond is not None:
    cond, negative = read_cond(args.cond)
  else:  # a class-token run (configs/mmdit_demo.py): labels -> its fixed context / pooled tables
    from dit_jax.workdir import class_tokens_of
    cond, negative = class_tokens_of(args.checkpoint)(_ints(args.class_labels, "--class-labels")), None
  if kind.name == "flux":
    from dit_jax.workdir import sampling_shift
    opts = sampling_options(args, default_shift=sampling_shift(training), default_cfg=1.0)
  else:
    opts = sampling_options(args, default_shift=training.get("flow_shift", 3.0))
  dtype = jnp.bfloat16 if args.bf16 else jnp.float32
  model = dit_jax.load(args.checkpoint, dtype=dtype)
  if prompts is not None:
    from dit_jax.text import tokenizers
    family = "flux" if kind.name == "flux" else "sd3"
    length = args.max_sequence_length
    text_options = dict(profile=args.profile or "diffusers",
                        max_sequence_length=(512 if family == "flux" else 256) if length is None else length)
    tokenizers.check_profile(**text_options)
    encoders = dit_jax.load_text_encoders(args.checkpoint)
    encoders.check_fits(model.config.joint_attention_dim, model.config.pooled_projection_dim, family)
  else:
    try:
      check_text_cond(model.config, cond, negative)
    except ValueError as e:
      raise ValueError(f"--cond {pathlib.Path(args.cond).name}: {e}") from None
  latent_size = None
  if args.latent_size is not None:
    latent_size = tuple(int(v) for v in _ints(args.latent_size, "--latent-size"))
    if len(latent_size) != 2:
      raise ValueError(f"--latent-size takes H,W in latent pixels, got {args.latent_size!r}")
  latent_size = kind.check_latent_size(model.config, latent_size)
  decode = _decoder(args, dtype)
  key = jax.random.key(args.seed)
  if prompts is None:
    latents = dit_jax.sample(model, cond, jax.random.fold_in(key, 0), negative=negative, latent_size=latent_size,
                             cfg_mode=args.cfg_mode, **opts)
  else:  # batches of --batch-size prompts, each encoded then sampled with its own key
    size = args.batch_size
    latents = jnp.concatenate([
        dit_jax.sample(model, prompts[i:i + size], jax.random.fold_in(key, i // size), negative=args.negative_prompt,
                       encoders=encoders, latent_size=latent_size, cfg_mode=args.cfg_mode, **text_options, **opts)
        for i in range(0, len(prompts), size)])
  images = sample_files.to_uint8(jax.device_get(decode(latents) if decode is not None else latents))
  out.parent.mkdir(parents=True, exist_ok=True)
  if out.suffix == ".npz":
    text = {"prompts": np.array(prompts, dtype=np.str_)} if prompts is not None else {}
    sample_files.save_npz(out, arr_0=images, latents=np.asarray(jax.device_get(latents), np.float32), **text)
  else:
    images = sample_files.displayable(images).repeat(args.zoom, axis=1).repeat(args.zoom, axis=2)
    sample_files.save_png(out, sample_files.image_grid(images, args.nrow))
  return f"wrote {out} ({len(images)} samples, {opts['method']} {opts['steps'] or 'default'} steps)"


def read_prompts(args: argparse.Namespace) -> list[str] | None:
  """--prompt (repeatable) or the lines of --prompts FILE (blank lines skipped); None when neither is given."""
  if args.prompt is not None:
    return args.prompt
  if args.prompts is None:
    return None
  path = pathlib.Path(args.prompts)
  if not path.is_file():
    raise FileNotFoundError(f"--prompts file {path} not found")
  try:
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
  except UnicodeDecodeError as e:
    raise ValueError(f"--prompts {path.name} is not UTF-8 text ({e.reason} at byte {e.start})") from None
  if not prompts:
    raise ValueError(f"--prompts {path.name} holds no prompts")
  return prompts


RUNNERS = {"labels": run_labels, "text": run_text}  # by the model kind's conditioning (dit_jax.kinds)


def main(argv=None) -> int:
  try:
    args = parse_args(argv)
  except SystemExit as e:  # --help, or a usage error already reported in one line
    return int(e.code or 0)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  from dit_jax.checkpoint import CheckpointError

  try:
    print(run(args))
  except (ValueError, CheckpointError, FileNotFoundError) as e:
    return fail(e)
  return 0


if __name__ == "__main__":
  sys.exit(main())
