"""Normalisation eps pinned by upstream oracles: DiT (both conventions and DiTConfig's defaults), MMDiT (LayerNorm
and QK RMSNorm) and the VAE (GroupNorm) against diffusers, with weights that keep every normalised input at
variance ~1e-6, where eps 1e-6 and 1e-5 differ by a factor ~2 in the normalised value (with the random weights of
the other parity tests the variance is O(1) and eps is invisible). fp32, matmul precision 'highest'."""
from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dit_jax.convert import dit_tables, mmdit_tables, vae_tables
from dit_jax.models.dit import DiTConfig
from tests.helpers import rel_err
from tests.helpers.reference import (as_original_convention_, diffusers_dit, dit_forward, dit_inputs,
                                     original_state_dict, tie_embedders_)

TOL = 1e-5
TINY = 1e-3  # amplitude of every residual stream: normalised inputs have variance ~1e-6
SENSITIVE = 1e-2  # an eps off by 10x moves the reference output by more than this (checked on the reference)


def tiny_streams_(model: torch.nn.Module, tiny: tuple[str, ...], tiny_bias: tuple[str, ...] = (), seed: int = 0
                  ) -> None:
  """Scale-preserving random weights (matrices and convs N(0, 1/fan_in), norm gains ~1, other vectors N(0, 0.05^2));
  parameters whose name contains one of ``tiny`` are multiplied by TINY: the embedders and every projection that
  writes into a normalised stream (so a stream stays ~TINY deep into the network); so are the biases of layers in
  ``tiny_bias`` (scale-preserving layers on a stream: resamplers, shortcuts)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim > 1:
        value = noise * (p[0].numel() ** -0.5)
      elif "norm" in name and name.endswith("weight"):
        value = 1 + 0.2 * noise
      else:
        value = 0.05 * noise
      small = any(t in name for t in tiny) or (p.ndim == 1 and any(t in name for t in tiny_bias))
      p.copy_(value * TINY if small else value)


_forward = nnx.jit(lambda model, *args: model(*args))


def _numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _with_eps(model: torch.nn.Module, kind: type, eps: float) -> torch.nn.Module:
  """A copy of ``model`` with every ``kind`` module's eps replaced (the sensitivity check of each test)."""
  other = copy.deepcopy(model)
  for module in other.modules():
    if isinstance(module, kind):
      module.eps = eps
  return other


# ---------------------------------------------------------------------------------------------------------------
# DiT: attn / final LayerNorm eps 1e-6; MLP LayerNorm eps 1e-5 (diffusers) or 1e-6 (original, DiTConfig default)

DIT = dict(heads=2, head_dim=16, depth=2, sample_size=8, patch=2, in_channels=4, num_classes=10)


@pytest.fixture(scope="module")
def dit():
  """(diffusers-convention reference, original-convention reference, inputs); patch embedder, sin-cos table,
  attention output and MLP output projections scaled by TINY."""
  ref = diffusers_dit(**DIT)
  tiny_streams_(ref, ("pos_embed.proj", "attn1.to_out", "ff.net.2"))
  tie_embedders_(ref)
  with torch.no_grad():
    ref.pos_embed.pos_embed.mul_(TINY)
  original = copy.deepcopy(ref)
  as_original_convention_(original)
  return ref, original, dit_inputs(4, DIT["sample_size"], DIT["in_channels"], DIT["num_classes"])


def _dit_err(ours, ref, x, t, y) -> tuple[float, float]:
  """(our error vs ref, how far ref moves when its MLP LayerNorm eps is off by 10x)."""
  want = dit_forward(ref, x, t, y)
  got = _forward(ours, x, t, y)
  wrong_eps = 1e-5 if ref.transformer_blocks[0].norm3.eps == 1e-6 else 1e-6
  other = copy.deepcopy(ref)
  for block in other.transformer_blocks:
    block.norm3.eps = wrong_eps
  return rel_err(got, want), rel_err(dit_forward(other, x, t, y), want)


def test_dit_bare_diffusers_file_uses_diffusers_eps(dit):
  """A diffusers state dict without config.json converts with CONVENTIONS['diffusers'] (MLP LayerNorm eps 1e-5)."""
  ref, _, (x, t, y) = dit
  tensors = _numpy(ref)
  cfg = dit_tables.infer_config(tensors, "diffusers", None, input_size=DIT["sample_size"], num_heads=DIT["heads"])
  ours = dit_tables.to_model(tensors, cfg, "diffusers")
  ours.pos_embed.value = jnp.asarray(ref.pos_embed.pos_embed[0].numpy())  # the same TINY table on both sides
  err, moved = _dit_err(ours, ref, x, t, y)
  assert moved > SENSITIVE, f"reference insensitive to the MLP eps: moved {moved:.1e}"
  print(f"diffusers DiT: rel err {err:.2e}; reference moved {moved:.2e} by a 10x MLP eps")
  assert err <= TOL, f"diffusers DiT (mlp_norm_eps {cfg.mlp_norm_eps}): rel err {err:.2e} > {TOL:.0e}"


@pytest.mark.parametrize("source", ["original-file", "config-defaults"])
def test_dit_original_convention_eps(dit, source):
  """An original .pt (CONVENTIONS['original']) and a DiTConfig left at its defaults (as training builds one)
  compute facebookresearch/DiT: MLP LayerNorm eps 1e-6, timestep shift 0."""
  _, ref, (x, t, y) = dit
  tensors = {k: v.numpy() for k, v in original_state_dict(ref).items()}  # with the stored TINY pos_embed
  if source == "original-file":
    cfg = dit_tables.infer_config(tensors, "original", None, num_heads=DIT["heads"])
  else:
    cfg = DiTConfig(input_size=DIT["sample_size"], patch_size=DIT["patch"], in_channels=DIT["in_channels"],
                    hidden_size=DIT["heads"] * DIT["head_dim"], depth=DIT["depth"], num_heads=DIT["heads"],
                    num_classes=DIT["num_classes"])
  err, moved = _dit_err(dit_tables.to_model(tensors, cfg, "original"), ref, x, t, y)
  assert moved > SENSITIVE, f"reference insensitive to the MLP eps: moved {moved:.1e}"
  print(f"{source}: rel err {err:.2e}; reference moved {moved:.2e} by a 10x MLP eps")
  assert err <= TOL, f"{source} (mlp_norm_eps {cfg.mlp_norm_eps}): rel err {err:.2e} > {TOL:.0e}"


# ---------------------------------------------------------------------------------------------------------------
# MMDiT: every LayerNorm and the QK RMSNorm eps 1e-6

MMDIT = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
             joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=20, out_channels=4,
             pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0,))


def test_mmdit_layer_norm_and_qk_rms_norm_eps():
  """Image and context streams ~TINY (patch / context embedders, stored table, every output projection), and q, k
  ~TINY before the RMSNorm (whose gains are ~1, so attention is peaked and sees the normalised q, k)."""
  from diffusers import SD3Transformer2DModel
  from diffusers.models.normalization import RMSNorm

  ref = SD3Transformer2DModel(**MMDIT).eval()
  tiny_streams_(ref, ("pos_embed.proj", "context_embedder", "to_out", "to_add_out", "ff.net.2", "ff_context.net.2",
                      "to_q", "to_k", "add_q_proj", "add_k_proj"))
  with torch.no_grad():
    ref.pos_embed.pos_embed.copy_(TINY * torch.randn(ref.pos_embed.pos_embed.shape,
                                                     generator=torch.Generator().manual_seed(1)))
  tensors = _numpy(ref)
  layout = mmdit_tables.detect_layout(tensors)
  ours = mmdit_tables.to_model(tensors, mmdit_tables.infer_config(tensors, layout, dict(ref.config)), layout)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  t = np.array([3.0, 750.5], np.float32)
  context = rng.standard_normal((2, 5, MMDIT["joint_attention_dim"])).astype(np.float32)
  pooled = rng.standard_normal((2, MMDIT["pooled_projection_dim"])).astype(np.float32)

  def forward(model):
    with torch.no_grad():
      out = model(hidden_states=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                  encoder_hidden_states=torch.from_numpy(context), pooled_projections=torch.from_numpy(pooled),
                  timestep=torch.from_numpy(t)).sample
    return out.numpy().transpose(0, 2, 3, 1)

  want = forward(ref)
  moved_ln = rel_err(forward(_with_eps(ref, torch.nn.LayerNorm, 1e-5)), want)
  moved_rms = rel_err(forward(_with_eps(ref, RMSNorm, 1e-5)), want)
  assert min(moved_ln, moved_rms) > SENSITIVE, f"reference insensitive: LayerNorm {moved_ln:.1e}, RMS {moved_rms:.1e}"
  err = rel_err(_forward(ours, x, t, context, pooled), want)
  print(f"MMDiT: rel err {err:.2e}; reference moved {moved_ln:.2e} (LayerNorm), {moved_rms:.2e} (RMSNorm) by 10x eps")
  assert err <= TOL, f"MMDiT with ~1e-6-variance norm inputs: rel err {err:.2e} > {TOL:.0e}"


# ---------------------------------------------------------------------------------------------------------------
# VAE: every GroupNorm eps 1e-6


def test_vae_group_norm_eps():
  """conv_in, both convs of every resnet and the attention output ~TINY (resamplers and shortcuts with TINY biases):
  every GroupNorm input (resnet norm1 / norm2, attention, norm_out) has variance ~1e-6, in encoder and decoder."""
  from diffusers import AutoencoderKL as TorchAutoencoderKL

  ref = TorchAutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                           block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4).eval()
  tiny_streams_(ref, ("conv_in", "conv1", "conv2", "to_out"), ("samplers", "conv_shortcut"))
  tensors = _numpy(ref)
  ours = vae_tables.to_model(tensors, vae_tables.infer_config(tensors, "diffusers", dict(ref.config)), "diffusers")
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))

  def forward(model):
    with torch.no_grad():
      posterior = model.encode(nchw(images)).latent_dist
      return [a.numpy().transpose(0, 2, 3, 1) for a in (posterior.mean, posterior.logvar, model.decode(nchw(z)).sample)]

  want = forward(ref)
  moved = min(rel_err(a, b) for a, b in zip(forward(_with_eps(ref, torch.nn.GroupNorm, 1e-5)), want))
  assert moved > SENSITIVE, f"reference insensitive to the GroupNorm eps: moved {moved:.1e}"
  posterior = nnx.jit(lambda m, a: m.encode(a))(ours, images)
  got = [posterior.mean, posterior.logvar, nnx.jit(lambda m, a: m.decode(a))(ours, z)]
  errs = {name: rel_err(a, b) for name, a, b in zip(("mean", "logvar", "decoded"), got, want)}
  print(f"VAE: rel errs {errs}; reference moved >= {moved:.2e} by a 10x GroupNorm eps")
  assert max(errs.values()) <= TOL, f"VAE with ~1e-6-variance GroupNorm inputs: rel errs {errs} > {TOL:.0e}"
