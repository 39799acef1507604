"""dit_jax.sample on an MMDiT end to end against diffusers' StableDiffusion3Pipeline (upstream transformer, scheduler
and loop) from the same initial latent and text embeddings: CFG, skip-layer guidance, Turbo-style no-CFG."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from dit_jax.convert import mmdit_tables
from dit_jax.convert.readers import read_source
from dit_jax.diffusion.guidance import SkipLayerGuidance
from dit_jax.diffusion.samplers import sample
from tests.helpers import rel_err
from tests.helpers.reference import SD3_TINY as TINY
from tests.helpers.reference import SD3_VARIANTS as VARIANTS
from tests.helpers.reference import diffusers_sd3

LATENT = (12, 20)  # non-square latent (h, w), within pos_embed_max_size * patch


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """variant -> (diffusers SD3Transformer2DModel, converted MMDiT), via save_pretrained -> read_source."""
  out = {}
  for i, name in enumerate(("sd3-medium", "sd3.5-medium")):
    ref = diffusers_sd3(seed=10 + i, **VARIANTS[name])
    folder = tmp_path_factory.mktemp(name.replace(".", "_"))
    ref.save_pretrained(folder)
    source = read_source(folder)
    cfg = mmdit_tables.infer_config(source.tensors, "diffusers", source.diffusers_config)
    out[name] = ref, mmdit_tables.to_model(source.tensors, cfg, "diffusers")
  return out


def _text(batch: int, seed: int):
  rng = np.random.default_rng(seed)
  return {"context": rng.standard_normal((batch, 5, TINY["joint_attention_dim"])).astype(np.float32),
          "pooled": rng.standard_normal((batch, TINY["pooled_projection_dim"])).astype(np.float32)}


def _pipeline_latents(ref, x_T, cond, negative, steps, guidance_scale, **kw) -> np.ndarray:
  """StableDiffusion3Pipeline without text encoders or VAE: precomputed embeddings in, final latents out (NHWC)."""
  from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

  pipe = StableDiffusion3Pipeline(transformer=ref, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
                                  text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                  text_encoder_3=None, tokenizer_3=None)
  pipe.set_progress_bar_config(disable=True)
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
  h, w = x_T.shape[1:3]
  neg = dict(negative_prompt_embeds=t(negative["context"]), negative_pooled_prompt_embeds=t(negative["pooled"])) \
      if negative is not None else {}
  with torch.no_grad():
    out = pipe(prompt_embeds=t(cond["context"]), pooled_prompt_embeds=t(cond["pooled"]), height=8 * h, width=8 * w,
               latents=t(x_T.transpose(0, 3, 1, 2)), num_inference_steps=steps, guidance_scale=guidance_scale,
               output_type="latent", **neg, **kw).images
  return out.numpy().transpose(0, 2, 3, 1)


def _noise(batch: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((batch, *LATENT, TINY["in_channels"])).astype(np.float32)


def test_euler_cfg_matches_pipeline(models):
  ref, ours = models["sd3-medium"]
  x_T, cond, negative = _noise(2, 0), _text(2, 1), _text(2, 2)
  expected = _pipeline_latents(ref, x_T, cond, negative, 6, 4.0)
  latents = sample(ours, cond, method="euler", steps=6, cfg_scale=4.0, negative=negative, latent_size=LATENT,
                   shift=3.0, noise=x_T)
  err = rel_err(latents, expected)
  assert latents.shape == expected.shape and err <= 1e-4, f"euler + CFG 4 vs StableDiffusion3Pipeline: {err:.2e}"


def test_skip_layer_guidance_matches_pipeline(models):
  ref, ours = models["sd3.5-medium"]
  x_T, cond, negative = _noise(2, 3), _text(2, 4), _text(1, 5)
  steps, slg = 8, dict(layers=[1], scale=2.8, start=0.1, stop=0.5)  # window: steps 1, 2, 3
  assert SkipLayerGuidance.parse(slg).window(steps).tolist() == [False, True, True, True] + [False] * 4
  negative2 = {k: np.repeat(v, 2, 0) for k, v in negative.items()}  # the pipeline wants B rows
  expected = _pipeline_latents(ref, x_T, cond, negative2, steps, 3.0, skip_guidance_layers=[1],
                               skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.1,
                               skip_layer_guidance_stop=0.5)
  latents = sample(ours, cond, steps=steps, cfg_scale=3.0, negative=negative, skip_layer_guidance=slg,
                   latent_size=LATENT, noise=x_T)
  err = rel_err(latents, expected)
  plain = sample(ours, cond, steps=steps, cfg_scale=3.0, negative=negative, latent_size=LATENT, noise=x_T)
  effect = rel_err(plain, expected)
  assert err <= 1e-4 and effect > 1e3 * err, f"SLG vs pipeline: {err:.2e} (without SLG: {effect:.2e})"


def test_turbo_style_no_cfg_matches_pipeline(models):
  ref, ours = models["sd3.5-medium"]
  x_T, cond = _noise(2, 6), _text(2, 7)
  expected = _pipeline_latents(ref, x_T, cond, None, 4, 0.0)
  latents = sample(ours, cond, method="euler", steps=4, cfg_scale=1.0, latent_size=LATENT, noise=x_T)
  err = rel_err(latents, expected)
  assert err <= 1e-4, f"4 euler steps without CFG vs pipeline (guidance_scale 0): {err:.2e}"


def test_presets_load_and_validate(tmp):
  from dit_jax.presets import load_preset

  medium = load_preset("sd35_medium")
  assert (medium.method, medium.steps, medium.shift, medium.cfg_scale) == ("dpmpp_2m_sd35", 50, 3.0, 5.0)
  assert SkipLayerGuidance.parse(medium.skip_layer_guidance) == SkipLayerGuidance((7, 8, 9), 2.5, 0.01, 0.2)
  assert load_preset("sd35_medium:diffusers").skip_layer_guidance.scale == 2.8
  assert (load_preset("sd35_large").steps, load_preset("sd35_large").cfg_scale) == (40, 4.5)
  turbo = load_preset("sd35_large_turbo")
  assert (turbo.method, turbo.steps, turbo.cfg_scale, turbo.skip_layer_guidance) == ("euler", 4, 1.0, None)
  assert load_preset("sd3_medium:diffusers").to_dict() == dict(flavour="diffusers", method="euler", steps=28,
                                                                shift=3.0, cfg_scale=7.0, skip_layer_guidance=None,
                                                                guidance=None, schedule=None)
  with pytest.raises(ValueError, match="unknown preset flavour 'fast'"):
    load_preset("sd35_large:fast")
  bad = tmp / "bad.py"
  bad.write_text("import ml_collections\ndef get_config():\n  return ml_collections.ConfigDict(dict(method='ddpm', "
                 "steps=5, shift=1.0, cfg_scale=1.0, skip_layer_guidance=None))\n")
  with pytest.raises(ValueError, match="invalid method"):
    load_preset(str(bad))


def test_mmdit_input_errors(models):
  _, ours = models["sd3-medium"]
  cond = _text(2, 0)
  bad = [
      (dict(cond=np.array([1, 2])), "conditioned on text embeddings"),
      (dict(method="ddim"), "VP-only"),
      (dict(cond={"context": cond["context"]}), "missing pooled"),
      (dict(cond={**cond, "extra": cond["pooled"]}), "unexpected extra"),
      (dict(cond={**cond, "pooled": cond["pooled"][:1]}), "context has 2 rows, pooled 1"),
      (dict(negative={k: v[:, :3] if k == "context" else v for k, v in cond.items()}), "negative context has 3"),
      (dict(latent_size=(12, 7)), "multiples of the patch size 2"),
      (dict(latent_size=(12, 50)), "exceeds pos_embed_max_size"),
      (dict(skip_layer_guidance={"layers": [3], "scale": 1.0}), r"outside the model's blocks 0\.\.2"),
      (dict(skip_layer_guidance={"layer": [1], "scale": 1.0}), "needs keys layers and scale"),
      (dict(flow_convention="sit"), "sd3 flow convention"),
  ]
  for overrides, fragment in bad:
    kw = dict(cond=cond, key=jax.random.key(0), steps=2) | overrides
    with pytest.raises(ValueError, match=fragment):
      sample(ours, kw.pop("cond"), kw.pop("key"), **kw)
