#!/usr/bin/env python
"""Check dit_jax's MMDiT against Stability's own reference model (``MMDiTX`` in Stability-AI/sd3.5 ``mmditx.py``).

The reference code is not part of dit_jax; point this script at a clone of https://github.com/Stability-AI/sd3.5
(it imports ``mmditx`` and ``other_impls`` from there). For SD3.5-Medium, SD3-Medium and SD3.5-Large shapes it
fills every parameter and buffer of a tiny ``MMDiTX`` with random values, saves it as a Stability single file
(``model.diffusion_model.*``), converts it with tools/convert_torch.py and compares the forward passes, with and
without skip layers, on a non-square latent that exercises the positional crop (fp32, matmul precision
'highest'). A negative control (the positional grid transposed) must fail. Exit status 0 when every relative
max-abs error is <= 1e-5.

  python tools/check_sd35_reference.py --sd35 path/to/sd3.5
"""
import argparse
import pathlib
import sys
import tempfile

import jax

jax.config.update("jax_default_matmul_precision", "highest")
import jax.numpy as jnp
import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import dit_jax
from tools.convert_torch import main as convert_cli

torch.set_num_threads(2)
DEPTH, IN_CH, ADM, JOINT, MAX = 3, 16, 20, 24, 24
SHAPES = {  # name -> (qk_norm, x_block_self_attn_layers)
    "SD3.5-Medium-shaped (qk rms, MMDiT-X dual attention in 0,1)": ("rms", [0, 1]),
    "SD3-Medium-shaped (no qk norm, no dual attention)": (None, []),
    "SD3.5-Large-shaped (qk rms, no dual attention)": ("rms", []),
}


def build(MMDiTX, qk_norm, dual, seed):
  hidden = 64 * DEPTH
  torch.manual_seed(seed)
  model = MMDiTX(input_size=None, patch_size=2, in_channels=IN_CH, depth=DEPTH, adm_in_channels=ADM,
                 context_embedder_config={"target": "torch.nn.Linear",
                                          "params": {"in_features": JOINT, "out_features": hidden}},
                 pos_embed_max_size=MAX, num_patches=MAX * MAX, qk_norm=qk_norm, x_block_self_attn_layers=dual,
                 out_channels=IN_CH, dtype=torch.float32)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
      r = torch.randn(t.shape, generator=gen)
      if name.endswith("pos_embed"):
        t.copy_(r)
      elif t.ndim > 1:
        t.copy_(r * t.shape[1] ** -0.5 if t.ndim == 2 else r * (t[0].numel() ** -0.5))
      elif ".ln_" in name:
        t.copy_(1 + 0.3 * r)
      else:
        t.copy_(0.3 * r)
  return model.eval()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sd35", required=True, help="a clone of Stability-AI/sd3.5 (holds mmditx.py, other_impls.py)")
  args = p.parse_args(argv)
  if not (pathlib.Path(args.sd35) / "mmditx.py").is_file():
    print(f"error: {args.sd35} has no mmditx.py (expected a clone of Stability-AI/sd3.5)", file=sys.stderr)
    return 2
  sys.path.insert(0, str(pathlib.Path(args.sd35).resolve()))
  from mmditx import MMDiTX

  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 12, 20, IN_CH)).astype(np.float32)  # 6x10 patches of a 24x24 table: crop (9, 7)
  t = np.array([3.0, 750.5], np.float32)  # sigma * 1000
  context = rng.standard_normal((2, 7, JOINT)).astype(np.float32)
  pooled = rng.standard_normal((2, ADM)).astype(np.float32)
  worst = 0.0
  for i, (name, (qk_norm, dual)) in enumerate(SHAPES.items()):
    ref_model = build(MMDiTX, qk_norm, dual, seed=i)
    with tempfile.TemporaryDirectory() as tmp:
      path = pathlib.Path(tmp) / "sd3_single.safetensors"
      save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in ref_model.state_dict().items()}, path)
      assert convert_cli([str(path), f"{tmp}/ckpt"]) == 0
      ours = dit_jax.load(f"{tmp}/ckpt")
    args = (jnp.asarray(x), jnp.asarray(t), jnp.asarray(context), jnp.asarray(pooled))
    for skip in ((), (1,)):
      with torch.no_grad():
        ref = ref_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                        y=torch.from_numpy(pooled), context=torch.from_numpy(context), layer_drops=list(skip))
      ref = ref.numpy().transpose(0, 2, 3, 1)
      out = np.asarray(ours(*args, skip_layers=skip), np.float64)
      err = float(np.abs(out - ref).max() / np.abs(ref).max())
      worst = max(worst, err)
      print(f"{name}, skip_layers={list(skip)}: out {out.shape}, max|ref| {np.abs(ref).max():.3f}, "
            f"rel max-abs err {err:.2e}")
  # negative control: the same converted model with its pos_embed grid transposed (a wrong crop axis) must fail
  table = ours.pos_embed[...].reshape(MAX, MAX, -1)
  ours.pos_embed[...] = jnp.swapaxes(table, 0, 1).reshape(MAX * MAX, -1)
  bad = np.asarray(ours(*args), np.float64)
  with torch.no_grad():
    ref = ref_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                    y=torch.from_numpy(pooled), context=torch.from_numpy(context)).numpy().transpose(0, 2, 3, 1)
  print(f"negative control (pos_embed grid transposed): rel max-abs err {np.abs(bad - ref).max() / np.abs(ref).max():.2e}")
  print(f"worst rel max-abs err {worst:.2e} -> {'PASS' if worst <= 1e-5 else 'FAIL'} (<= 1e-5)")
  return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
  sys.exit(main())
