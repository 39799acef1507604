#!/usr/bin/env python
"""Convert PyTorch DiT / MMDiT (SD3, SD3.5) / FLUX.1 / VAE checkpoints (and the FID Inception-v3) to dit_jax
checkpoint directories, and back.

  python tools/convert_torch.py DiT-XL-2-256x256.pt ckpt/dit_xl2_256          # original state dict
  python tools/convert_torch.py results/000-DiT-XL-2/checkpoints/0400000.pt out --weights model
  python tools/convert_torch.py path/to/DiT-XL-2-256 ckpt/diffusers_xl2       # diffusers pipeline folder (+ its vae/)
  python tools/convert_torch.py DiT-XL-2-256x256.pt ckpt/x --vae path/to/sd-vae-ft-ema   # bundle a VAE
  python tools/convert_torch.py sd-v1-5.safetensors ckpt/sd15-vae --vae-preset sd-vae-ft-ema  # an SD file's VAE
  python tools/convert_torch.py path/to/stable-diffusion-3.5-medium ckpt/sd35m   # SD3 pipeline folder: MMDiT, VAE,
                                                                                 # text encoders and tokenizers
  python tools/convert_torch.py sd3.5_medium.safetensors ckpt/sd35m \
      --text-encoders sd3.5/text_encoders --tokenizers path/to/stable-diffusion-3.5-medium   # Stability's files
  python tools/convert_torch.py flux1-dev.safetensors ckpt/flux-dev --vae ae.safetensors   # BFL files (or ComfyUI's)
  python tools/convert_torch.py path/to/FLUX.1-schnell ckpt/flux-schnell    # FluxPipeline folder: transformer + vae/
  python tools/convert_torch.py ae.safetensors ckpt/flux-vae                # FLUX VAE alone (scale 0.3611 shift 0.1159)
  python tools/convert_torch.py pt_inception-2015-12-05-6726825d.pth ckpt/inception   # pytorch-fid's or torch-
                                                                    # fidelity's FID Inception (sha256 recorded)
  python tools/convert_torch.py ckpt/sd35m/text_encoders/clip_g clip_g.safetensors --to torch   # hf layout
  python tools/convert_torch.py ckpt/dit_xl2_256 dit.safetensors --to torch [--layout original|diffusers]
  python tools/convert_torch.py ckpt/sd35m sd35m.safetensors --to torch [--layout stability|diffusers]
  python tools/convert_torch.py ckpt/flux-dev flux1-dev.safetensors --to torch [--layout bfl|diffusers]

Conversions stream tensor by tensor (peak memory: the converted model plus about one source tensor). Errors are
reported in one line on stderr with exit status 2: option values are checked before anything is read, and
non-float or NaN / Inf weights (unless --allow-nonfinite), a config.json that does not describe the weights and
every key or shape mismatch are refused; nothing already on disk is overwritten unless --overwrite is given.
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dit_jax import kinds  # noqa: E402
from dit_jax.checkpoint import BUNDLED_VAE, CheckpointError, read_meta  # noqa: E402
from dit_jax.cli import ArgumentParser, fail  # noqa: E402
from dit_jax.convert import ConversionError  # noqa: E402
from dit_jax.convert.engine import FLOAT_DTYPES  # noqa: E402
from dit_jax.convert.files import convert, export  # noqa: E402
from dit_jax.text.encoders import BUNDLED as BUNDLED_TEXT  # noqa: E402
from dit_jax.models.vae import PRESETS  # noqa: E402


def _int_list(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def parse_args(argv=None) -> argparse.Namespace:
  p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("src", help="torch .pt/.bin/.safetensors, diffusers folder, or (with --to torch) a dit_jax dir")
  p.add_argument("out", help="output checkpoint directory, or (with --to torch) a .safetensors file")
  p.add_argument("--to", choices=["jax", "torch"], default="jax", help="direction (default: jax)")
  p.add_argument("--format", dest="layout", default="auto", choices=["auto", "original", "diffusers", "stability", "bfl"],
                 help="source key layout (import; default: auto-detect); original = DiT (or bfl), stability = MMDiT, "
                      "bfl = FLUX")
  p.add_argument("--layout", dest="export_layout", default="original",
                 choices=["original", "diffusers", "stability", "bfl", "ldm", "hf", "openclip"],
                 help="key layout of the exported safetensors (--to torch; default: original, i.e. stability for an "
                      "MMDiT, bfl for FLUX and ldm for a VAE)")
  p.add_argument("--vae", default=None, help="a VAE (diffusers folder / file, LDM or SD single file) to bundle")
  p.add_argument("--no-vae", action="store_true",
                 help="do not bundle a pipeline folder's vae/ or a single file's first_stage_model.*")
  p.add_argument("--vae-preset", default=None, choices=list(PRESETS),
                 help="latent scale preset when the VAE source records none (default for a 16-channel VAE bundled "
                      "with an MMDiT: sd3); an error when no VAE is converted")
  p.add_argument("--weights", choices=["ema", "model"], default=None,
                 help="which weights of a DiT training checkpoint to import (default: ema)")
  p.add_argument("--num-heads", type=int, default=None,
                 help="attention heads, if not inferable (an MMDiT's num_attention_heads)")
  p.add_argument("--input-size", type=int, default=None,
                 help="latent side, if not stored (diffusers files; an MMDiT's sample_size)")
  p.add_argument("--num-classes", type=int, default=None,
                 help="number of classes; equal to the label-table rows for a model trained without label dropout "
                      "(default: rows - 1, the last row being the null class)")
  p.add_argument("--text-encoders", default=None,
                 help="an SD3 / FLUX model's text encoders: a folder with Stability's / ComfyUI's clip_l.safetensors, "
                      "clip_g.safetensors (SD3) and t5xxl*.safetensors (or a pipeline folder); default: the source's "
                      "own")
  p.add_argument("--tokenizers", default=None,
                 help="a folder with the tokenizers' files (tokenizer/, tokenizer_2/, tokenizer_3/ as a diffusers SD3 "
                      "or FluxPipeline folder has them) when the source has none")
  p.add_argument("--no-text-encoders", action="store_true",
                 help="do not bundle a pipeline folder's text_encoder*/ or a single file's text_encoders.*")
  p.add_argument("--axes-dims-rope", type=_int_list, default=None, metavar="A,B,C",
                 help="a FLUX transformer's rotary widths per position axis when neither a config.json nor 128-wide "
                      "heads (FLUX.1: 16,56,56) give them")
  p.add_argument("--allow-nonfinite", action="store_true",
                 help="convert weights holding NaN / Inf (refused by default)")
  p.add_argument("--dtype", default=None, choices=FLOAT_DTYPES,
                 help="dtype of exported tensors (default: the imported dtype)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing output")
  return p.parse_args(argv)


def summary(cfg, out: pathlib.Path) -> str:
  """One line describing a converted model (and the VAE bundled with it)."""
  text = kinds.get(read_meta(out)["kind"]).describe(cfg)
  if (out / BUNDLED_VAE).is_dir():
    vae = read_meta(out / BUNDLED_VAE)["config"]
    text += (f" + bundled VAE (latent={vae['latent_channels']} scale={vae['scaling_factor']} "
             f"shift={vae['shift_factor']})")
  encoders = [p.name for p in sorted((out / BUNDLED_TEXT).glob("*")) if (p / "dit_jax.json").is_file()]
  if encoders:
    text += f" + text encoders ({', '.join(encoders)}) with their tokenizers"
  return text


def main(argv=None) -> int:
  try:
    args = parse_args(argv)
  except SystemExit as e:  # --help, or a usage error already reported in one line
    return int(e.code or 0)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    if args.to == "torch":
      path = export(args.src, args.out, layout=args.export_layout, dtype=args.dtype, overwrite=args.overwrite)
      from safetensors import safe_open
      with safe_open(str(path), framework="np") as f:
        layout = (f.metadata() or {}).get("dit_jax_layout", args.export_layout)
      print(f"wrote {path} ({layout} layout)")
    else:
      cfg = convert(args.src, args.out, layout=args.layout, weights=args.weights, num_heads=args.num_heads,
                    input_size=args.input_size, num_classes=args.num_classes, vae=args.vae,
                    bundle_vae=not args.no_vae, vae_preset=args.vae_preset, overwrite=args.overwrite,
                    allow_nonfinite=args.allow_nonfinite, text_encoders=args.text_encoders,
                    tokenizers=args.tokenizers, bundle_text_encoders=not args.no_text_encoders,
                    axes_dims_rope=args.axes_dims_rope)
      print(f"wrote {args.out}: {summary(cfg, pathlib.Path(args.out))}")
  except (ConversionError, CheckpointError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
    return fail(e)
  return 0


if __name__ == "__main__":
  sys.exit(main())
