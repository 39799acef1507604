"""The CLIP text transformer of SD3 / SD3.5 (and SDXL, FLUX): OpenAI CLIP-L/14 and OpenCLIP bigG/14, in Flax NNX.

Module names follow transformers' ``CLIPTextModel`` (``token_embedding``, ``position_embedding``,
``layers.N.{layer_norm1, self_attn, layer_norm2, mlp}``, ``final_layer_norm``, ``text_projection``) with the
attention projections fused as OpenCLIP stores them (``self_attn.qkv`` rows [q | k | v], head-major);
:mod:`dit_jax.convert.clip_tables` maps both layouts onto it. Pre-LN blocks with a causal mask:

    h_0 = token_embedding[ids] + position_embedding[:L]
    h_i = h' + fc2(act(fc1(LN2(h'))))   with   h' = h_{i-1} + out_proj(causal_attention(LN1(h_{i-1})))
    last = LN_final(h_N);   pooled = last[b, argmax(ids[b])];   text_embeds = pooled @ text_projection

``act`` is ``quick_gelu`` (a * sigmoid(1.702 a), OpenAI CLIP-L) or the exact erf ``gelu`` (OpenCLIP bigG).
The pooled token is the first position of the largest id, the EOS token 49407 in every SD3 prompt (transformers
and Stability's ``sd3_infer.py`` pick the same position there). LayerNorm statistics and affine run in float32.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dit_jax.models import layers
from dit_jax.models.config import JsonConfig, check_all
from dit_jax.models.layers import logical

ACTIVATIONS = {
    "quick_gelu": lambda a: a * jax.nn.sigmoid(1.702 * a),
    "gelu": lambda a: jax.nn.gelu(a, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(JsonConfig):
  """Hyper-parameters named as transformers' ``CLIPTextConfig``; ``projection_dim`` None: no text_projection."""

  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int | None = None
  eos_token_id: int = 49407

  def __post_init__(self):
    sizes = (self.vocab_size, self.hidden_size, self.intermediate_size, self.num_hidden_layers,
             self.num_attention_heads, self.max_position_embeddings)
    check_all([
        (all(isinstance(s, int) and s > 0 for s in sizes), f"all sizes must be positive integers, got {sizes}"),
        (self.hidden_size % self.num_attention_heads == 0,
         f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"),
        (self.hidden_act in ACTIVATIONS, f"hidden_act {self.hidden_act!r} is not one of {tuple(ACTIVATIONS)}"),
        (self.layer_norm_eps > 0, f"layer_norm_eps {self.layer_norm_eps} must be positive"),
        (self.projection_dim is None or (isinstance(self.projection_dim, int) and self.projection_dim > 0),
         f"projection_dim {self.projection_dim!r} must be None or a positive integer"),
        (0 <= self.eos_token_id < self.vocab_size, f"eos_token_id {self.eos_token_id} outside the vocabulary"),
    ], "invalid CLIP text config")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


# SD3's two text encoders (sd3_infer.py CLIPL_CONFIG / CLIPG_CONFIG); SD3 uses CLIP-L's pooled unprojected.
CLIP_L = CLIPTextConfig(projection_dim=768)
CLIP_G = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                        hidden_act="gelu", projection_dim=1280)
PRESETS = {"clip_l": CLIP_L, "clip_g": CLIP_G}


class LayerNorm(nnx.Module):
  """torch.nn.LayerNorm over the last axis with weight (``scale``) and bias; statistics and affine in float32,
  result in the input dtype: (..., D) -> (..., D)."""

  def __init__(self, dim: int, *, eps: float, param_dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), **logical(None))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), **logical(None))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = layers.layer_norm(x.astype(jnp.float32), self.eps)
    return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class CausalSelfAttention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection and a causal mask: (B, L, D) -> (B, L, D)."""

  def __init__(self, cfg: CLIPTextConfig, rngs: nnx.Rngs, *, dtype, param_dtype):
    d, kw = cfg.hidden_size, dict(dtype=dtype, param_dtype=param_dtype)
    self.heads = cfg.num_attention_heads
    self.qkv = layers.linear(d, 3 * d, rngs, axes=("embed", "heads"), **kw)
    self.out_proj = layers.linear(d, d, rngs, axes=("heads", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)
    # XLA softmax(q k^T / sqrt(d_h)) v with the future positions (triu(1)) masked out of every row
    out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True,
                                       implementation="xla")
    return self.out_proj(out.reshape(b, n, d))


class MLP(nnx.Module):
  """fc1 -> act -> fc2: (B, L, D) -> (B, L, D)."""

  def __init__(self, cfg: CLIPTextConfig, rngs: nnx.Rngs, *, dtype, param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.act = cfg.hidden_act
    self.fc1 = layers.linear(cfg.hidden_size, cfg.intermediate_size, rngs, axes=("embed", "mlp"), **kw)
    self.fc2 = layers.linear(cfg.intermediate_size, cfg.hidden_size, rngs, axes=("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class EncoderLayer(nnx.Module):
  """Pre-LN transformer block: (B, L, D) -> (B, L, D)."""

  def __init__(self, cfg: CLIPTextConfig, rngs: nnx.Rngs, *, dtype, param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
    self.self_attn = CausalSelfAttention(cfg, rngs, **kw)
    self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
    self.mlp = MLP(cfg, rngs, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nnx.Module):
  """CLIP text transformer. Call: ``model(ids, hidden_layer=-2)`` with ids (B, L) int token ids, L at most
  ``max_position_embeddings``; returns a dict of arrays in the compute dtype:

  * ``hidden`` (B, L, D): entry ``hidden_layer`` of transformers' ``hidden_states`` (index 0 the embeddings,
    i the output of layer i; -2 the penultimate layer's output, SD3's context), no final LayerNorm;
  * ``last`` (B, L, D): final_layer_norm(output of the last layer) (``last_hidden_state``);
  * ``pooled`` (B, D): ``last`` at the first position of the largest id (the EOS) (``pooler_output``);
  * ``text_embeds`` (B, P): pooled @ text_projection, only when ``projection_dim`` is set.
  """

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    cfg = self.config = config
    d, kw = cfg.hidden_size, dict(dtype=dtype, param_dtype=param_dtype)
    self.dtype = dtype
    self.token_embedding = nnx.Embed(cfg.vocab_size, d, param_dtype=param_dtype, embedding_init=layers.normal_002,
                                     rngs=rngs, embedding_metadata=logical(None, "embed"))
    self.position_embedding = nnx.Param(layers.normal_002(rngs.params(), (cfg.max_position_embeddings, d),
                                                          param_dtype), **logical(None, "embed"))
    self.layers = nnx.List([EncoderLayer(cfg, rngs, **kw) for _ in range(cfg.num_hidden_layers)])
    self.final_layer_norm = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
    self.text_projection = (None if cfg.projection_dim is None else
                            layers.linear(d, cfg.projection_dim, rngs, axes=("embed", None), use_bias=False, **kw))

  def __call__(self, ids: jax.Array, hidden_layer: int = -2) -> dict[str, jax.Array]:
    cfg = self.config
    n_states = cfg.num_hidden_layers + 1  # transformers' hidden_states: embeddings, then every layer's output
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"CLIP text model expects (B, L) integer token ids, got {ids.dtype} {tuple(ids.shape)}")
    if ids.shape[1] > cfg.max_position_embeddings:
      raise ValueError(f"{ids.shape[1]} tokens exceed max_position_embeddings {cfg.max_position_embeddings}")
    if not -n_states <= hidden_layer < n_states:
      raise ValueError(f"hidden_layer {hidden_layer} outside the {n_states} hidden states "
                       f"(-{n_states}..{n_states - 1})")
    take = hidden_layer % n_states
    x = (self.token_embedding(ids).astype(jnp.float32)
         + self.position_embedding[...][:ids.shape[1]].astype(jnp.float32)).astype(self.dtype)  # (B, L, D)
    hidden = x
    for i, layer in enumerate(self.layers):
      x = layer(x)  # (B, L, D)
      if i + 1 == take:
        hidden = x
    last = self.final_layer_norm(x)  # (B, L, D)
    pooled = jnp.take_along_axis(last, jnp.argmax(ids, axis=-1)[:, None, None], axis=1)[:, 0]  # (B, D)
    out = {"hidden": hidden, "last": last, "pooled": pooled}
    if self.text_projection is not None:
      out["text_embeds"] = self.text_projection(pooled)  # (B, P)
    return out
