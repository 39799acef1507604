"""Reference models and checkpoint layouts: upstream (diffusers) DiT, SD3 MMDiT and VAE pieces with random
weights, and the original / Stability / LDM state-dict key layouts written out independently of dit_jax's tables."""
from __future__ import annotations

import numpy as np
import torch

# ---- DiT (facebookresearch/DiT and diffusers DiTTransformer2DModel)

# Original facebookresearch/DiT key <- diffusers key, as diffusers' scripts/convert_dit_to_diffusers.py maps them
# (written out independently of dit_jax's own key table so the two can disagree).
ORIGINAL_FROM_DIFFUSERS_BLOCK = {
    "attn.proj": "attn1.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm1.linear",
}


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


def dit_forward(model, x_nhwc: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Run a diffusers DiT on NHWC numpy input; returns NHWC numpy."""
  with torch.no_grad():
    out = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                torch.from_numpy(y)).sample
  return out.numpy().transpose(0, 2, 3, 1)


def dit_inputs(batch: int, size: int, channels: int, num_classes: int, seed: int = 0):
  """Random latents, timesteps spanning 0..999 and class ids including the null class."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, size, size, channels)).astype(np.float32)
  t = np.linspace(0, 999, batch).round().astype(np.float32)
  y = rng.integers(0, num_classes, batch)
  y[-1] = num_classes
  return x, t, y.astype(np.int64)


# ---- SD3 / SD3.5 MMDiT (diffusers SD3Transformer2DModel, Stability single files)

SD3_TINY = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=20,
                out_channels=4, pos_embed_max_size=24)

# Tiny configs shaped like the released models (diffusers transformer/config.json).
SD3_VARIANTS = {
    "sd3-medium": dict(qk_norm=None, dual_attention_layers=()),
    "sd3.5-medium": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)),
    "sd3.5-large": dict(qk_norm="rms_norm", dual_attention_layers=()),
}


def diffusers_sd3(seed: int = 0, **kw):
  """A random-weight SD3Transformer2DModel in eval mode; the stored pos_embed buffer is random too, so a wrong
  crop offset cannot hide behind the smoothness of the sin-cos table."""
  from diffusers import SD3Transformer2DModel

  model = SD3Transformer2DModel(**{**SD3_TINY, **kw})
  randomize_(model, seed)
  with torch.no_grad():
    model.pos_embed.pos_embed.copy_(torch.randn(model.pos_embed.pos_embed.shape,
                                                generator=torch.Generator().manual_seed(seed + 1)))
  return model.eval()


def sd3_forward(model, x, t, context, pooled) -> np.ndarray:
  """Run a diffusers SD3Transformer2DModel on NHWC numpy input; returns NHWC numpy."""
  with torch.no_grad():
    out = model(hidden_states=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                encoder_hidden_states=torch.from_numpy(context), pooled_projections=torch.from_numpy(pooled),
                timestep=torch.from_numpy(t)).sample
  return out.numpy().transpose(0, 2, 3, 1)


def stability_state_dict(tensors: dict[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
  """Stability single-file keys (``model.diffusion_model.*``) from diffusers keys, written out from the mapping
  in diffusers' scripts/convert_sd3_to_diffusers.py independently of dit_jax's tables: fused qkv, and the
  (scale, shift) halves of AdaLayerNormContinuous swapped back to (shift, scale)."""
  swap = lambda a: np.concatenate(np.split(a, 2)[::-1])
  renames = {"pos_embed.proj": "x_embedder.proj", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
             "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
             "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "context_embedder": "context_embedder",
             "proj_out": "final_layer.linear"}
  out = {"pos_embed": tensors["pos_embed.pos_embed"]}
  for kind in ("weight", "bias"):
    for theirs, ours in renames.items():
      out[f"{ours}.{kind}"] = tensors[f"{theirs}.{kind}"]
    out[f"final_layer.adaLN_modulation.1.{kind}"] = swap(tensors[f"norm_out.linear.{kind}"])
  block_map = {"norm1.linear": "x_block.adaLN_modulation.1", "attn.to_out.0": "x_block.attn.proj",
               "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
               "attn2.to_out.0": "x_block.attn2.proj", "norm1_context.linear": "context_block.adaLN_modulation.1",
               "attn.to_add_out": "context_block.attn.proj", "ff_context.net.0.proj": "context_block.mlp.fc1",
               "ff_context.net.2": "context_block.mlp.fc2"}
  norm_map = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
              "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
              "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k"}
  for i in range(num_layers):
    tb, jb = f"transformer_blocks.{i}", f"joint_blocks.{i}"
    for kind in ("weight", "bias"):
      for theirs, ours in block_map.items():
        if f"{tb}.{theirs}.{kind}" in tensors:
          value = tensors[f"{tb}.{theirs}.{kind}"]
          out[f"{jb}.{ours}.{kind}"] = swap(value) if theirs == "norm1_context.linear" and i == num_layers - 1 \
              else value
      for theirs, ours in (("attn.to_", "x_block.attn"), ("attn2.to_", "x_block.attn2"),
                           ("attn.add_", "context_block.attn")):
        parts = [f"{tb}.{theirs}{c}{'_proj' if 'add' in theirs else ''}.{kind}" for c in "qkv"]
        if parts[0] in tensors:
          out[f"{jb}.{ours}.qkv.{kind}"] = np.concatenate([tensors[k] for k in parts])
    for theirs, ours in norm_map.items():
      if f"{tb}.{theirs}.weight" in tensors:
        out[f"{jb}.{ours}.weight"] = tensors[f"{tb}.{theirs}.weight"]
  fused = 2 * num_layers + len([k for k in tensors if k.endswith(".attn2.to_q.weight")])  # 3 linears -> 1 each
  assert len(out) == len(tensors) - 4 * fused, "a diffusers key was not mapped"
  return {f"model.diffusion_model.{k}": v for k, v in out.items()}


# ---- VAE (CompVis LDM single-file layout)

def ldm_state_dict(tensors: dict, n: int) -> dict:
  """diffusers AutoencoderKL keys -> CompVis LDM keys (decoder levels reversed, attention as 1x1 convs)."""
  out = {}
  for key, value in tensors.items():
    new = key
    for diff, ldm in (("mid_block.resnets.0", "mid.block_1"), ("mid_block.resnets.1", "mid.block_2"),
                      ("mid_block.attentions.0.group_norm", "mid.attn_1.norm"),
                      ("mid_block.attentions.0.to_out.0", "mid.attn_1.proj_out"),
                      ("conv_norm_out", "norm_out"), ("conv_shortcut", "nin_shortcut"),
                      ("downsamplers.0", "downsample"), ("upsamplers.0", "upsample"), (".resnets.", ".block.")):
      new = new.replace(diff, ldm)
    for x in "qkv":
      new = new.replace(f"mid_block.attentions.0.to_{x}", f"mid.attn_1.{x}")
    new = new.replace("down_blocks.", "down.")
    if new.startswith("decoder.up_blocks."):
      i = int(new.split(".")[2])
      new = f"decoder.up.{n - 1 - i}." + ".".join(new.split(".")[3:])
    if ".attn_1." in new and new.endswith("weight") and value.ndim == 2:
      value = value[:, :, None, None]
    out[new] = value
  return out
