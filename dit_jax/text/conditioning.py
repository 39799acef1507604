"""Prompt -> text conditioning for SD3 and FLUX.1.

SD3: CLIP-L and CLIP-G penultimate states side by side, zero-padded to T5's width, then the T5 states after them
along the sequence; pooled = [CLIP-L pooled, CLIP-G projected pooled].

    context (B, 77 + L_t5, D_t5), pooled (B, 768 + 1280)

Two SD3 profiles (see :mod:`dit_jax.text.tokenizers`): ``diffusers`` is what ``StableDiffusion3Pipeline.encode_prompt``
computes (CLIP-L's pooled through its text projection when the checkpoint has one, T5 padded to
``max_sequence_length``, no T5 -> that many zero tokens); ``sd35_reference`` is Stability's ``sd3_infer.py``
(CLIP-L pooled unprojected, T5 at least 77 tokens, no T5 -> 77 zero tokens).

FLUX.1 (``FluxPipeline.encode_prompt``, and BFL's ``HFEmbedder`` computes the same): the T5 last hidden state of the
prompt truncated / padded to ``max_sequence_length`` (default 512; BFL runs schnell at 256) with no attention mask,
and CLIP-L's unprojected pooler output (77 tokens); no CLIP-G.

    context (B, max_sequence_length, D_t5), pooled (B, 768)
"""
from __future__ import annotations

import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.text import tokenizers
from dit_jax.text.encoders import TextEncoders
from dit_jax.text.profiles import CLIP_TOKENS

logger = logging.getLogger("dit_jax")

REFERENCE_T5_TOKENS = 77  # Stability's T5 minimum length: its zero stand-in without T5 as well
DEFAULT_T5_TOKENS = {"sd3": 256, "flux": 512}  # StableDiffusion3Pipeline's / FluxPipeline's max_sequence_length


@nnx.jit(static_argnames=("hidden_layer",))
def _clip(model, ids: jax.Array, hidden_layer: int):
  out = model(ids, hidden_layer=hidden_layer)
  return out["hidden"], out["pooled"], out.get("text_embeds", out["pooled"])


@nnx.jit
def _t5(model, ids: jax.Array):
  return model(ids)


def _prompts(prompts, what: str) -> list[str]:
  if not isinstance(prompts, (str, list, tuple)):
    raise ValueError(f"{what} must be a string or a list of strings, not {type(prompts).__name__}")
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  if not prompts:
    raise ValueError(f"{what} is empty: give at least one prompt")
  bad = [p for p in prompts if not isinstance(p, str)]
  if bad:
    raise ValueError(f"{what} must be strings, got a {type(bad[0]).__name__}")
  return prompts


def _encode(encoders: TextEncoders, prompts: list[str], profile: str, max_sequence_length: int,
            clip_skip: int | None, context_dim: int) -> dict[str, jax.Array]:
  ids = tokenizers.tokenize(encoders.tokenizers, prompts, profile=profile, max_sequence_length=max_sequence_length)
  hidden_layer = -2 if clip_skip is None else -(clip_skip + 2)
  l_hidden, l_pooled, l_projected = _clip(encoders.clip_l, jnp.asarray(ids["clip_l"]), hidden_layer)
  g_hidden, _, g_projected = _clip(encoders.clip_g, jnp.asarray(ids["clip_g"]), hidden_layer)
  clip = jnp.concatenate([l_hidden, g_hidden], axis=-1).astype(jnp.float32)
  if encoders.t5 is not None:
    t5 = _t5(encoders.t5, jnp.asarray(ids["t5"])).astype(jnp.float32)
  else:
    length = max_sequence_length if profile == "diffusers" else REFERENCE_T5_TOKENS
    t5 = jnp.zeros((len(prompts), length, context_dim), jnp.float32)
  clip = jnp.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
  pooled_l = l_projected if profile == "diffusers" else l_pooled
  return {"context": jnp.concatenate([clip, t5], axis=1),
          "pooled": jnp.concatenate([pooled_l, g_projected], axis=-1).astype(jnp.float32)}


def _encode_flux(encoders: TextEncoders, prompts: list[str], max_sequence_length: int) -> dict[str, jax.Array]:
  clip_ids, clip_cut = encoders.tokenizers["clip_l"].encode(prompts, CLIP_TOKENS, return_truncated=True)
  t5_ids, t5_cut = encoders.tokenizers["t5"].encode(prompts, max_sequence_length, return_truncated=True)
  cut = [i for i, (a, b) in enumerate(zip(clip_cut, t5_cut)) if a or b]
  if cut:
    logger.warning("%d of %d prompts truncated (FLUX: CLIP-L keeps %d tokens, T5 %d): prompt%s %s", len(cut),
                   len(prompts), CLIP_TOKENS, max_sequence_length, "" if len(cut) == 1 else "s",
                   ", ".join(str(i) for i in cut[:10]) + (", ..." if len(cut) > 10 else ""))
  _, pooled, _ = _clip(encoders.clip_l, jnp.asarray(clip_ids), -1)
  return {"context": _t5(encoders.t5, jnp.asarray(t5_ids)).astype(jnp.float32),
          "pooled": pooled.astype(jnp.float32)}


def encode_prompt(encoders: TextEncoders, prompts: str | Sequence[str], *, negative: str | Sequence[str] | None = None,
                  family: str = "sd3", profile: str = "diffusers", max_sequence_length: int | None = None,
                  clip_skip: int | None = None, context_dim: int | None = None) -> dict[str, jax.Array]:
  """SD3 / SD3.5 or FLUX.1 text conditioning of ``prompts`` (and of ``negative``: one prompt or one per prompt).

  Args:
    encoders: :func:`dit_jax.load_text_encoders` (SD3: CLIP-L, CLIP-G and optionally T5; FLUX: CLIP-L and T5; each
      with its tokenizer).
    family: 'sd3' (StableDiffusion3Pipeline / sd3_infer.py) or 'flux' (FluxPipeline: T5 context, CLIP-L pooled).
    profile: SD3 only: 'diffusers' (StableDiffusion3Pipeline) or 'sd35_reference' (Stability's sd3_infer.py).
    max_sequence_length: T5 tokens (at most 512; default 256 for SD3's diffusers profile, 512 for FLUX).
    clip_skip: SD3 only: CLIP layers skipped before the hidden state taken (None: the penultimate layer's output).
    context_dim: SD3 only: the context width without T5 (the MMDiT's joint_attention_dim; default 4096).
  Returns:
    {"context": (B, L, D), "pooled": (B, Dp)} float32, plus "negative_context" / "negative_pooled" when
    ``negative`` is given.
  """
  prompts = _prompts(prompts, "prompts")
  encoders.require(family)
  if max_sequence_length is None:
    max_sequence_length = DEFAULT_T5_TOKENS[family]
  tokenizers.check_profile(profile, max_sequence_length)
  if family == "flux":
    unused = [f"{k}={v!r}" for k, v in (("profile", profile), ("clip_skip", clip_skip), ("context_dim", context_dim))
              if v not in (None, "diffusers")]
    if unused:
      raise ValueError(f"{unused[0]} is for SD3 prompts; FLUX encodes as FluxPipeline does")
    encode = lambda texts: _encode_flux(encoders, texts, max_sequence_length)
  else:
    if clip_skip is not None and not 0 <= clip_skip <= encoders.clip_layers - 2:
      raise ValueError(f"clip_skip must be in 0..{encoders.clip_layers - 2}, got {clip_skip}")
    width = encoders.context_dim(context_dim)
    encode = lambda texts: _encode(encoders, texts, profile, max_sequence_length, clip_skip, width)
  out = encode(prompts)
  if negative is not None:
    negative = _prompts(negative, "negative prompts")
    if len(negative) not in (1, len(prompts)):
      raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts: give one or one per prompt")
    neg = encode(negative)
    if neg["context"].shape[1] != out["context"].shape[1]:
      raise ValueError(f"the prompts give {out['context'].shape[1]} context tokens and the negative prompts "
                       f"{neg['context'].shape[1]} ({profile} profile: T5 is unpadded past 77 tokens); classifier-free "
                       "guidance needs equal lengths: use the diffusers profile or shorter prompts")
    out.update({f"negative_{k}": jnp.broadcast_to(v, (len(prompts), *v.shape[1:])) for k, v in neg.items()})
  return out


def prompt_cond(config, encoders: TextEncoders | None, prompts, negative=None, *, cfg_scale: float = 1.0,
                **options) -> tuple[dict, dict | None]:
  """(cond, negative) embeddings of an MMDiT's or a FLUX model's prompts for :func:`dit_jax.sample`.

  MMDiT: the negative prompt defaults to "" (StableDiffusion3Pipeline). FLUX: the negative prompt is encoded only
  for true CFG (``cfg_scale`` > 1), default "" then (FluxPipeline skips true CFG without a negative prompt); without
  it the negative is None (the sampler runs the conditional pass alone).
  """
  from dit_jax.models.flux import FluxConfig

  if encoders is None:
    raise ValueError("sampling from prompts needs the text encoders: dit_jax.sample(..., "
                     "encoders=dit_jax.load_text_encoders(checkpoint_dir))")
  if not hasattr(config, "joint_attention_dim"):
    raise ValueError("prompts condition an MMDiT or a FLUX model; this model takes class labels")
  family = "flux" if isinstance(config, FluxConfig) else "sd3"
  encoders.check_fits(config.joint_attention_dim, config.pooled_projection_dim, family)
  if family == "flux":
    if cfg_scale <= 1 and negative is not None:
      logger.warning("the negative prompt is unused: FLUX applies it with true CFG only (cfg_scale > 1)")
    negative = ("" if negative is None else negative) if cfg_scale > 1 else None
  else:
    negative, options = "" if negative is None else negative, {**options, "context_dim": config.joint_attention_dim}
  out = encode_prompt(encoders, prompts, negative=negative, family=family, **options)
  cond = {"context": out["context"], "pooled": out["pooled"]}
  if negative is None:
    return cond, None
  return cond, {"context": out["negative_context"], "pooled": out["negative_pooled"]}
