"""T5 v1.1 encoder key table (transformers ``T5EncoderModel``, as SD3 pipelines, SD3 single files and FLUX ship
it) -> :class:`T5Encoder`, layout detection, config inference and export.

transformers keeps the relative-attention table in block 0 only (every layer reuses its bias) and the token
embedding as ``shared.weight``, tied to ``encoder.embed_tokens.weight`` (files hold either or both; both must then
be identical). An SD3 single file stores the encoder under :data:`SD3_PREFIX` (:func:`select_t5_tensors`).

    tensors = select_t5_tensors(tensors)                  # prefix stripped, a full T5's decoder left out
    layout = detect_layout(tensors)                       # 'hf'
    cfg = infer_config(tensors, layout, config_json)
    model = to_model(tensors, cfg, layout)                # strict: every key used, every parameter filled
    tensors = from_model(model, layout)                   # the exact inverse
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.convert.engine import (
  Rule,
  apply_table,
  checked_config,
  config_agrees,
  count_blocks,
  export_table,
  need,
  pick_table,
)
from dit_jax.convert.readers import ConversionError
from dit_jax.models.t5 import T5Encoder, T5EncoderConfig

SD3_PREFIX = "text_encoders.t5xxl.transformer."
EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight")  # tied copies of the token embedding
DROPPED_PREFIXES = ("decoder.", "lm_head.")  # a full T5's seq2seq half, ignored as T5EncoderModel ignores it
_BLOCK0 = "encoder.block.0.layer"
_BIAS = f"{_BLOCK0}.0.SelfAttention.relative_attention_bias.weight"
# transformers config.json: fields the weights' shapes also show (checked against them), those they do not (taken
# from it), and the model types it may name.
_SHAPE_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets")
_CONFIG_FIELDS = ("relative_attention_max_distance", "layer_norm_epsilon", "feed_forward_proj")
MODEL_TYPES = ("t5",)


def hf_table(cfg: T5EncoderConfig, embedding_keys: tuple[str, ...] = ("shared.weight",)) -> list[Rule]:
  """transformers ``T5EncoderModel`` state dict; ``embedding_keys``: the stored copies of the token embedding."""
  rules = [
      Rule(("shared", "embedding"), tuple(embedding_keys), merge="tied" if len(embedding_keys) > 1 else "one"),
      Rule(("relative_attention_bias",), (_BIAS,)),
      Rule(("final_layer_norm", "scale"), ("encoder.final_layer_norm.weight",)),
  ]
  for i in range(cfg.num_layers):
    src, dst = f"encoder.block.{i}.layer", ("blocks", i)
    rules.append(Rule(dst + ("attn_norm", "scale"), (f"{src}.0.layer_norm.weight",)))
    rules += [Rule(dst + ("attn", n, "kernel"), (f"{src}.0.SelfAttention.{n}.weight",), "T") for n in "qkvo"]
    rules.append(Rule(dst + ("ff_norm", "scale"), (f"{src}.1.layer_norm.weight",)))
    rules += [Rule(dst + ("ff", n, "kernel"), (f"{src}.1.DenseReluDense.{n}.weight",), "T")
              for n in ("wi_0", "wi_1", "wo")]
  return rules


LAYOUTS = {"hf": hf_table}
ORIGINAL_LAYOUT = "hf"  # what export's layout "original" means: transformers' T5EncoderModel keys
FILE_PREFIX: dict[str, str] = {}  # layout -> the key prefix of an exported file


def select_t5_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The T5 encoder's tensors of a source: the keys under :data:`SD3_PREFIX` (stripped) when there are any (an
  SD3 single file), else all keys; ``decoder.*`` / ``lm_head.*`` of a full T5 are left out."""
  if any(k.startswith(SD3_PREFIX) for k in tensors):
    tensors = {k[len(SD3_PREFIX):]: v for k, v in tensors.items() if k.startswith(SD3_PREFIX)}
  return {k: v for k, v in tensors.items() if not k.startswith(DROPPED_PREFIXES)}


def is_t5(tensors: dict[str, np.ndarray]) -> bool:
  """True for a T5 encoder state dict (after :func:`select_t5_tensors`)."""
  return f"{_BLOCK0}.0.SelfAttention.q.weight" in tensors


def detect_layout(tensors: dict[str, np.ndarray]) -> str:
  """'hf' (the only layout), from the key names; a one-line ConversionError for anything else."""
  if is_t5(tensors) or _BIAS in tensors:
    return "hf"
  raise ConversionError(f"not a T5 encoder state dict: no {_BLOCK0}.0.SelfAttention.q.weight (transformers "
                        f"T5EncoderModel; an SD3 single file's {SD3_PREFIX}* is selected by select_t5_tensors)")


def embedding_keys(tensors: dict[str, np.ndarray]) -> tuple[str, ...]:
  """The copies of the token embedding present (``shared.weight`` when there is none, so it is reported)."""
  return tuple(k for k in EMBEDDING_KEYS if k in tensors) or EMBEDDING_KEYS[:1]


def infer_config(tensors: dict[str, np.ndarray], layout: str, diffusers_config: dict[str, Any] | None = None,
                 **overrides) -> T5EncoderConfig:
  """T5EncoderConfig from the weights' shapes (heads from the bias table, d_kv = q rows / heads). A transformers
  ``config.json`` dict (``diffusers_config``) supplies what shapes do not show (max distance, eps, feed-forward
  kind; defaults 128, 1e-6, gated-gelu); a config.json of another model type, with impossible values or
  contradicting the shapes is an error naming the field. ``overrides`` win over both."""
  pick_table(LAYOUTS, layout, "T5 encoder")
  tensors = select_t5_tensors(tensors)
  dcfg = _checked_config(diffusers_config)
  embedding = need(tensors, embedding_keys(tensors)[0], "T5 encoder")
  bias = need(tensors, _BIAS, "T5 encoder")
  q = need(tensors, f"{_BLOCK0}.0.SelfAttention.q.weight", "T5 encoder")
  wi_0 = need(tensors, f"{_BLOCK0}.1.DenseReluDense.wi_0.weight", "T5 encoder")
  if bias.ndim != 2 or q.ndim != 2 or q.shape[0] % bias.shape[1]:
    raise ConversionError(f"cannot split the q rows {tuple(q.shape)} into the heads of {_BIAS} {tuple(bias.shape)}")
  heads = bias.shape[1]
  values = dict(vocab_size=embedding.shape[0], d_model=embedding.shape[1], d_kv=q.shape[0] // heads,
                d_ff=wi_0.shape[0], num_layers=count_blocks(tensors, "encoder.block", "T5 blocks"), num_heads=heads,
                relative_attention_num_buckets=bias.shape[0])
  config_agrees(dcfg, **values)
  values.update({k: dcfg[k] for k in _CONFIG_FIELDS if dcfg.get(k) is not None})
  values.update({k: v for k, v in overrides.items() if v is not None})
  try:
    return T5EncoderConfig(**values)
  except (ValueError, TypeError) as e:
    raise ConversionError(str(e).splitlines()[0]) from None


def _checked_config(config: dict[str, Any] | None) -> dict[str, Any]:
  """transformers' config.json checked before use (a T5 ``model_type``, positive sizes, numeric eps)."""
  dcfg = checked_config(config, (), *_SHAPE_FIELDS, "relative_attention_max_distance",
                        numbers=("layer_norm_epsilon",))
  if dcfg.get("model_type") not in (None, *MODEL_TYPES):
    raise ConversionError(f"config.json describes a {dcfg['model_type']!r} model, not a T5 encoder "
                          f"(model_type {' / '.join(MODEL_TYPES)}): it does not belong to these weights")
  return dcfg


def to_model(tensors: dict[str, np.ndarray], cfg: T5EncoderConfig, layout: str, *, dtype=jnp.float32,
             param_dtype=jnp.float32, allow_nonfinite: bool = False) -> T5Encoder:
  """Apply the layout's key table strictly and streaming (:func:`~dit_jax.convert.engine.apply_table`: every source
  key used, every parameter filled, shapes and float dtypes checked, NaN / Inf refused unless ``allow_nonfinite``);
  the source is first passed through :func:`select_t5_tensors`. fp16 / bf16 sources are cast to ``param_dtype``
  (``wo`` to float32)."""
  table = pick_table(LAYOUTS, layout, "T5 encoder")
  tensors = select_t5_tensors(tensors)
  abstract = nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
  return apply_table(tensors, table(cfg, embedding_keys(tensors)), abstract, cfg, what=f"{layout} T5 encoder",
                     allow_nonfinite=allow_nonfinite)


def from_model(model: T5Encoder, layout: str, *, embedding: tuple[str, ...] = ("shared.weight",)
               ) -> dict[str, np.ndarray]:
  """The exact inverse of :func:`to_model`: the layout's key -> numpy array, the token embedding under the
  ``embedding`` keys (transformers' ``save_pretrained`` writes ``shared.weight`` only)."""
  bad = sorted(set(embedding) - set(EMBEDDING_KEYS))
  if not embedding or bad:
    raise ConversionError(f"embedding keys must be among {', '.join(EMBEDDING_KEYS)}, got {list(embedding)}")
  return export_table(model, pick_table(LAYOUTS, layout, "T5 encoder")(model.config, tuple(embedding)))
