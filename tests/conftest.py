"""Shared fixtures: fp32 'highest' matmuls, random-weight upstream (diffusers) DiT models in their real formats."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

jax.config.update("jax_default_matmul_precision", "highest")
torch.set_num_threads(2)

# Original facebookresearch/DiT key <- diffusers key, as diffusers' scripts/convert_dit_to_diffusers.py maps them
# (written out independently of dit_jax's own key table so the two can disagree).
ORIGINAL_FROM_DIFFUSERS_BLOCK = {
    "attn.proj": "attn1.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm1.linear",
}


def rel_err(ours, ref) -> float:
  """Relative max-abs error max|ours - ref| / max|ref|."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
  """Fill every parameter with non-zero random values of realistic scale (1/sqrt(fan_in) for matrices)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in sorted(module.named_parameters()):
      std = p.shape[-1] ** -0.5 if p.ndim > 1 else 0.05
      p.copy_(torch.randn(p.shape, generator=gen) * std)


def tie_embedders_(model) -> None:
  """diffusers keeps one copy of the timestep/label embedder per block; a converted DiT has identical copies."""
  first = model.transformer_blocks[0].norm1.emb.state_dict()
  for block in model.transformer_blocks[1:]:
    block.norm1.emb.load_state_dict(first)


def diffusers_dit(*, heads=4, head_dim=16, depth=2, sample_size=16, patch=2, in_channels=4, learn_sigma=True,
                  num_classes=10, norm_eps=1e-5, seed=0):
  """A diffusers DiTTransformer2DModel with random tied weights, in eval mode."""
  from diffusers import DiTTransformer2DModel

  torch.manual_seed(seed)
  model = DiTTransformer2DModel(
      num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_channels,
      out_channels=2 * in_channels if learn_sigma else in_channels, num_layers=depth, sample_size=sample_size,
      patch_size=patch, num_embeds_ada_norm=num_classes, norm_eps=norm_eps)
  randomize_(model, seed)
  tie_embedders_(model)
  return model.eval()


def as_original_convention_(model) -> None:
  """Make a diffusers DiT compute exactly what facebookresearch/DiT computes: timestep frequencies divided by
  half (downscale_freq_shift 0) and LayerNorm eps 1e-6 before the MLP."""
  for block in model.transformer_blocks:
    block.norm1.emb.time_proj.downscale_freq_shift = 0
    block.norm3.eps = 1e-6


def original_state_dict(model) -> dict[str, torch.Tensor]:
  """The facebookresearch/DiT state dict (key names, fused qkv, stored pos_embed) of a diffusers DiT."""
  sd = {k: v.clone() for k, v in model.state_dict().items()}
  emb = "transformer_blocks.0.norm1.emb"
  out = {
      "pos_embed": model.pos_embed.pos_embed.clone(),
      "x_embedder.proj.weight": sd["pos_embed.proj.weight"], "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
      "y_embedder.embedding_table.weight": sd[f"{emb}.class_embedder.embedding_table.weight"],
      "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
      "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
      "final_layer.linear.weight": sd["proj_out_2.weight"], "final_layer.linear.bias": sd["proj_out_2.bias"],
  }
  for ours, theirs in (("0", "1"), ("2", "2")):
    for kind in ("weight", "bias"):
      out[f"t_embedder.mlp.{ours}.{kind}"] = sd[f"{emb}.timestep_embedder.linear_{theirs}.{kind}"]
  for i in range(len(model.transformer_blocks)):
    b = f"transformer_blocks.{i}"
    for kind in ("weight", "bias"):
      out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([sd[f"{b}.attn1.to_{x}.{kind}"] for x in "qkv"])
      for ours, theirs in ORIGINAL_FROM_DIFFUSERS_BLOCK.items():
        out[f"blocks.{i}.{ours}.{kind}"] = sd[f"{b}.{theirs}.{kind}"]
  return out


def torch_forward(model, x_nhwc: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Run a diffusers DiT on NHWC numpy input; returns NHWC numpy."""
  with torch.no_grad():
    out = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                torch.from_numpy(y)).sample
  return out.numpy().transpose(0, 2, 3, 1)


def inputs(batch: int, size: int, channels: int, num_classes: int, seed: int = 0):
  """Random latents, timesteps spanning 0..999 and class ids including the null class."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, size, size, channels)).astype(np.float32)
  t = np.linspace(0, 999, batch).round().astype(np.float32)
  y = rng.integers(0, num_classes, batch)
  y[-1] = num_classes
  return x, t, y.astype(np.int64)


@pytest.fixture
def tmp(tmp_path):
  return tmp_path
