"""FLUX.1 references: diffusers ``FluxTransformer2DModel`` with random weights, its forward on NHWC latents with
FluxPipeline's packing and ids, the BFL single-file key layout written independently of dit_jax's tables, and
diffusers' own BFL -> diffusers converter made to accept tiny widths."""
from __future__ import annotations

import types

import numpy as np
import torch

from tests.helpers.reference import randomize_

# Tiny FLUX: 2 heads of 32 (rotary axes 8 + 12 + 12), 2 double and 2 single blocks, 4-channel latents.
FLUX_TINY = dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
                 joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(8, 12, 12))
FLUX_VARIANTS = {"dev": dict(guidance_embeds=True), "schnell": dict(guidance_embeds=False)}


def diffusers_flux(seed: int = 0, **kw):
  """A diffusers FluxTransformer2DModel of FLUX_TINY (+ kw) with random weights, in eval mode."""
  from diffusers import FluxTransformer2DModel

  torch.manual_seed(seed)
  model = FluxTransformer2DModel(**{**FLUX_TINY, **kw})
  randomize_(model, seed)
  return model.eval()


def flux_forward(model, x: np.ndarray, t: np.ndarray, context: np.ndarray, pooled: np.ndarray,
                 guidance: np.ndarray | None = None) -> np.ndarray:
  """diffusers' forward on NHWC latents x (B, H, W, C): packed, with img_ids / txt_ids, and unpacked as
  FluxPipeline does; returns (B, H, W, C_out) float32."""
  from diffusers import FluxPipeline

  b, h, w, c = x.shape
  latents = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  packed = FluxPipeline._pack_latents(latents, b, c, h, w)
  img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
  txt_ids = torch.zeros(context.shape[1], 3)
  with torch.no_grad():
    out = model(hidden_states=packed, encoder_hidden_states=torch.from_numpy(context),
                pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t), img_ids=img_ids,
                txt_ids=txt_ids, guidance=None if guidance is None else torch.from_numpy(guidance)).sample
  return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8).numpy().transpose(0, 2, 3, 1)


def _swap(a: np.ndarray) -> np.ndarray:
  first, second = np.split(a, 2, axis=0)
  return np.concatenate([second, first], axis=0)


def bfl_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
  """The BFL single-file state dict (``flux/model.py`` names) of a diffusers FLUX state dict, as numpy."""
  sd = {k: v.detach().numpy() for k, v in sd.items()}
  out: dict[str, np.ndarray] = {}

  def lin(dst, src, swap=False):
    for p in ("weight", "bias"):
      out[f"{dst}.{p}"] = _swap(sd[f"{src}.{p}"]) if swap else sd[f"{src}.{p}"]

  def cat(dst, srcs):
    for p in ("weight", "bias"):
      out[f"{dst}.{p}"] = np.concatenate([sd[f"{s}.{p}"] for s in srcs])

  lin("img_in", "x_embedder")
  lin("txt_in", "context_embedder")
  for bfl, dif in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                   ("guidance_in", "guidance_embedder")):
    if f"time_text_embed.{dif}.linear_1.weight" in sd:
      lin(f"{bfl}.in_layer", f"time_text_embed.{dif}.linear_1")
      lin(f"{bfl}.out_layer", f"time_text_embed.{dif}.linear_2")
  double = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
  for i in double:
    s, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
    lin(f"{d}.img_mod.lin", f"{s}.norm1.linear")
    lin(f"{d}.txt_mod.lin", f"{s}.norm1_context.linear")
    cat(f"{d}.img_attn.qkv", [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v"])
    cat(f"{d}.txt_attn.qkv", [f"{s}.attn.add_q_proj", f"{s}.attn.add_k_proj", f"{s}.attn.add_v_proj"])
    out[f"{d}.img_attn.norm.query_norm.scale"] = sd[f"{s}.attn.norm_q.weight"]
    out[f"{d}.img_attn.norm.key_norm.scale"] = sd[f"{s}.attn.norm_k.weight"]
    out[f"{d}.txt_attn.norm.query_norm.scale"] = sd[f"{s}.attn.norm_added_q.weight"]
    out[f"{d}.txt_attn.norm.key_norm.scale"] = sd[f"{s}.attn.norm_added_k.weight"]
    lin(f"{d}.img_attn.proj", f"{s}.attn.to_out.0")
    lin(f"{d}.txt_attn.proj", f"{s}.attn.to_add_out")
    lin(f"{d}.img_mlp.0", f"{s}.ff.net.0.proj")
    lin(f"{d}.img_mlp.2", f"{s}.ff.net.2")
    lin(f"{d}.txt_mlp.0", f"{s}.ff_context.net.0.proj")
    lin(f"{d}.txt_mlp.2", f"{s}.ff_context.net.2")
  single = sorted({int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")})
  for i in single:
    s, d = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
    lin(f"{d}.modulation.lin", f"{s}.norm.linear")
    cat(f"{d}.linear1", [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp"])
    lin(f"{d}.linear2", f"{s}.proj_out")
    out[f"{d}.norm.query_norm.scale"] = sd[f"{s}.attn.norm_q.weight"]
    out[f"{d}.norm.key_norm.scale"] = sd[f"{s}.attn.norm_k.weight"]
  lin("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
  lin("final_layer.linear", "proj_out")
  return out


def diffusers_from_bfl(bfl: dict[str, np.ndarray], hidden: int) -> dict[str, torch.Tensor]:
  """diffusers' own ``convert_flux_transformer_checkpoint_to_diffusers`` on a BFL state dict. The upstream function
  hard-codes FLUX.1's width 3072 (to split ``linear1``); this runs a copy whose constant is ``hidden``."""
  from diffusers.loaders import single_file_utils

  fn = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers
  consts = tuple(hidden if c == 3072 and type(c) is int else c for c in fn.__code__.co_consts)
  assert consts != fn.__code__.co_consts, "diffusers' FLUX converter no longer holds the width 3072"
  patched = types.FunctionType(fn.__code__.replace(co_consts=consts), fn.__globals__, fn.__name__)
  return patched({k: torch.from_numpy(np.array(v)) for k, v in bfl.items()})
