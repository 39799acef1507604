#!/usr/bin/env python
"""Prompt encoding: dit_jax's jitted CLIP / T5 encoders vs transformers' CLIPTextModelWithProjection /
T5EncoderModel, side by side.

CLIP-L/14 at its real size (123M parameters, 77 tokens) and a width-reduced T5 v1.1 (the shape of t5-v1_1-large:
24 layers, d_model 1024, 16 heads, d_ff 2816; SD3's 256 tokens), same random weights, same token ids, fp32 on this
machine. Prints prompts/s, the ratio, MFU and the relative difference of the outputs.

  python bench/text_encode.py [--batch 4] [--iters 3]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from common import median_seconds, start_run  # also puts the repository root on sys.path

T5_LARGE = dict(vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16)


def clip_pair():
  from transformers import CLIPTextConfig, CLIPTextModelWithProjection

  from dit_jax.convert import clip_tables

  config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          projection_dim=768, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407)
  ref = CLIPTextModelWithProjection(config).eval()
  tensors = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v.numpy()
             for k, v in ref.state_dict().items()}
  cfg = clip_tables.infer_config(tensors, "hf")
  return ref, clip_tables.to_model(tensors, cfg, "hf"), cfg


def t5_pair():
  from transformers import T5Config, T5EncoderModel

  from dit_jax.convert import t5_tables

  ref = T5EncoderModel(T5Config(**T5_LARGE, feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
  tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
  cfg = t5_tables.infer_config(tensors, "hf")
  return ref, t5_tables.to_model(tensors, cfg, "hf"), cfg


def flops(layers: int, width: int, ff_matrices: int, ff: int, tokens: int, batch: int) -> float:
  """Forward FLOPs: 2 x (4 D^2 attention + the FF matrices) per token and layer, plus 4 L^2 D for the scores."""
  per_layer = 2 * tokens * (4 * width * width + ff_matrices * width * ff) + 4 * tokens * tokens * width
  return batch * layers * per_layer


def row(name, batch, tokens, ours, ref, ids, total_flops, peak, iters) -> str:
  graphdef, state = nnx.split(ours)
  run = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  pick = lambda out: out["last"] if isinstance(out, dict) else out
  x = jnp.asarray(ids)
  jax_s = median_seconds(lambda: jax.block_until_ready(run(state, x)), iters, warmup=1)
  xt = torch.from_numpy(ids.astype(np.int64))
  with torch.inference_mode():
    torch_s = median_seconds(lambda: ref(input_ids=xt), iters, warmup=1)
    expected = ref(input_ids=xt).last_hidden_state.numpy()
  got = np.asarray(pick(run(state, x)))
  err = float(np.abs(got - expected).max() / np.abs(expected).max())
  return (f"| {name} | {batch} | {tokens} | {batch / jax_s:.2f} | {batch / torch_s:.2f} | {torch_s / jax_s:.2f}x | "
          f"{total_flops / jax_s / peak:.1%} | {total_flops / torch_s / peak:.1%} | {err:.1e} |")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--iters", type=int, default=3)
  args = p.parse_args()
  peak = start_run()
  rng = np.random.default_rng(0)
  print("| encoder | batch | tokens | dit_jax prompts/s | transformers prompts/s | ratio (ours/theirs) | dit_jax MFU | "
        "transformers MFU | rel err (last state) |")
  print("|---|---|---|---|---|---|---|---|---|")
  ref, ours, cfg = clip_pair()
  ids = rng.integers(1, 49406, (args.batch, 77)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 49406, 49407
  total = flops(cfg.num_hidden_layers, cfg.hidden_size, 2, cfg.intermediate_size, 77, args.batch)
  print(row("CLIP-L/14 (123M)", args.batch, 77, ours, ref, ids, total, peak, args.iters), flush=True)
  del ref, ours
  ref, ours, cfg = t5_pair()
  ids = rng.integers(2, 32000, (args.batch, 256)).astype(np.int32)
  ids[:, -1] = 1
  total = flops(cfg.num_layers, cfg.d_model, 3, cfg.d_ff, 256, args.batch)
  print(row("T5 v1.1 large shape (24 x 1024)", args.batch, 256, ours, ref, ids, total, peak, args.iters))


if __name__ == "__main__":
  main()
