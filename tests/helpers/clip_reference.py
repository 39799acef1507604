"""Reference CLIP text encoders: transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` with random
weights, their outputs, token ids shaped like SD3's, and the OpenCLIP native key layout written from a transformers
state dict (independently of dit_jax's tables; open_clip itself is not imported)."""
from __future__ import annotations

import numpy as np
import torch

BOS, EOS = 49406, 49407

# Tiny encoders with the real vocabulary: CLIP-L-like (OpenAI quick_gelu, no projection as SD3 uses it) and
# CLIP-G-like (OpenCLIP exact gelu, with projection).
CLIP_TINY_L = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=24)
CLIP_TINY_G = dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                   num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                   projection_dim=48)


def randomize_clip_(model: torch.nn.Module, seed: int = 0) -> None:
  """Realistic random weights: matrices ~ N(0, 1/fan_in), LayerNorm weights 1 + N(0, 0.1^2), biases N(0, 0.1^2)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      if p.ndim > 1:
        p.copy_(torch.randn(p.shape) * p.shape[-1] ** -0.5)
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.1 * torch.randn(p.shape))
      else:
        p.copy_(0.1 * torch.randn(p.shape))


def hf_clip(config: dict, *, projection: bool, seed: int = 0):
  """A transformers CLIPTextModel (``projection`` False) or CLIPTextModelWithProjection, random weights, eval."""
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

  cls = CLIPTextModelWithProjection if projection else CLIPTextModel
  model = cls(CLIPTextConfig(**config, bos_token_id=BOS, eos_token_id=EOS, attn_implementation="eager"))
  randomize_clip_(model, seed)
  return model.eval()


def hf_state_dict(model) -> dict[str, np.ndarray]:
  """The model's weights under the key names of its safetensors files (``text_model.*``, ``text_projection.weight``):
  transformers >= 5.6 keeps a CLIPTextModel's modules without the ``text_model.`` prefix in memory."""
  out = {}
  for k, v in model.state_dict().items():
    if not k.startswith(("text_model.", "text_projection.")):
      k = "text_model." + k
    out[k] = v.detach().numpy().copy()
  return out


def hf_outputs(model, ids: np.ndarray) -> dict:
  """hidden_states (tuple, embeddings first), last_hidden_state, pooler_output and, with a projection,
  text_embeds of a transformers CLIP text model, as numpy."""
  inner = getattr(model, "text_model", model)
  with torch.no_grad():
    t = torch.from_numpy(ids)
    out = inner(input_ids=t, output_hidden_states=True)
    res = {"hidden_states": tuple(h.numpy() for h in out.hidden_states), "last": out.last_hidden_state.numpy(),
           "pooled": out.pooler_output.numpy()}
    if hasattr(model, "text_projection"):
      res["text_embeds"] = model(input_ids=t).text_embeds.numpy()
  return res


def sd3_ids(batch: int, length: int = 77, *, pad: int, seed: int = 0) -> np.ndarray:
  """(B, L) int64 prompts as SD3's tokenizers give them: BOS, random words (ids < BOS), EOS, then ``pad``
  (EOS 49407 for CLIP-L, 0 for CLIP-G); row b has 3 + 9 b words, the last row fills the whole length."""
  rng = np.random.default_rng(seed)
  ids = np.full((batch, length), pad, np.int64)
  for b in range(batch):
    n = length - 2 if b == batch - 1 else min(3 + 9 * b, length - 2)
    ids[b, 0], ids[b, 1:n + 1], ids[b, n + 1] = BOS, rng.integers(1, BOS, n), EOS
  return ids


def openclip_state_dict(hf_state: dict[str, np.ndarray], *, logit_scale: bool = True) -> dict[str, np.ndarray]:
  """OpenCLIP's text-tower state dict (``open_clip.CLIP`` names, fused ``in_proj``, ``text_projection`` stored
  (D, P)) holding the weights of a transformers ``hf_state`` (file key names, see :func:`hf_state_dict`)."""
  t = "text_model."
  out = {"token_embedding.weight": hf_state[f"{t}embeddings.token_embedding.weight"],
         "positional_embedding": hf_state[f"{t}embeddings.position_embedding.weight"],
         "ln_final.weight": hf_state[f"{t}final_layer_norm.weight"],
         "ln_final.bias": hf_state[f"{t}final_layer_norm.bias"]}
  layers = sorted({int(k.split(".")[3]) for k in hf_state if k.startswith(f"{t}encoder.layers.")})
  names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1",
           "mlp.c_proj": "mlp.fc2"}
  for i in layers:
    src, dst = f"{t}encoder.layers.{i}", f"transformer.resblocks.{i}"
    for kind in ("weight", "bias"):
      out[f"{dst}.attn.in_proj_{kind}"] = np.concatenate([hf_state[f"{src}.self_attn.{c}_proj.{kind}"] for c in "qkv"])
      for theirs, ours in names.items():
        out[f"{dst}.{theirs}.{kind}"] = hf_state[f"{src}.{ours}.{kind}"]
  if "text_projection.weight" in hf_state:
    out["text_projection"] = np.ascontiguousarray(hf_state["text_projection.weight"].T)
  if logit_scale:
    out["logit_scale"] = np.asarray(np.log(1 / 0.07), np.float32)
  return out
