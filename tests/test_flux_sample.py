"""dit_jax.sample on FLUX end to end against diffusers' FluxPipeline (upstream transformer, scheduler and loop) from
the same initial latent and embeddings: schnell (4 unshifted steps, no guidance input) and dev (guidance 3.5,
resolution shift) at two resolutions, both schedule flavours, true CFG; the schedules against diffusers' scheduler
and BFL's worked values; the presets; one-line errors."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from dit_jax.convert import flux_tables
from dit_jax.convert.readers import read_source
from dit_jax.diffusion import flow
from dit_jax.diffusion.samplers import sample
from dit_jax.presets import load_preset
from tests.helpers import rel_err
from tests.helpers.flux_reference import FLUX_TINY, FLUX_VARIANTS, diffusers_flux
from tests.helpers.processes import main_in_process

RESOLUTIONS = [(8, 8), (6, 10)]  # latent (h, w): square and non-square
TEXT_LEN = 7


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """variant -> (diffusers FluxTransformer2DModel, converted Flux), via save_pretrained -> read_source."""
  out = {}
  for i, (name, kw) in enumerate(FLUX_VARIANTS.items()):
    ref = diffusers_flux(seed=20 + i, **kw)
    folder = tmp_path_factory.mktemp(name)
    ref.save_pretrained(folder)
    source = read_source(folder)
    cfg = flux_tables.infer_config(source.tensors, "diffusers", source.diffusers_config)
    out[name] = ref, flux_tables.to_model(source.tensors, cfg, "diffusers")
  return out


def _scheduler(variant: str):
  """The scheduler configs of the FLUX.1 [dev] / [schnell] pipelines (dynamic shifting for dev only)."""
  from diffusers import FlowMatchEulerDiscreteScheduler

  if variant == "dev":
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)
  return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)


def _text(batch: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"context": rng.standard_normal((batch, TEXT_LEN, FLUX_TINY["joint_attention_dim"])).astype(np.float32),
          "pooled": rng.standard_normal((batch, FLUX_TINY["pooled_projection_dim"])).astype(np.float32)}


def _noise(batch: int, h: int, w: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((batch, h, w, FLUX_TINY["in_channels"] // 4)).astype(np.float32)


def _pipeline_latents(ref, variant, x_T, cond, steps, guidance_scale, negative=None, true_cfg_scale=1.0):
  """FluxPipeline without text encoders or VAE: precomputed embeddings and an NHWC initial latent in, final
  latents out (NHWC)."""
  from diffusers import FluxPipeline

  pipe = FluxPipeline(scheduler=_scheduler(variant), vae=None, text_encoder=None, tokenizer=None,
                      text_encoder_2=None, tokenizer_2=None, transformer=ref)
  pipe.set_progress_bar_config(disable=True)
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
  b, h, w, c = x_T.shape
  packed = FluxPipeline._pack_latents(t(x_T.transpose(0, 3, 1, 2)), b, c, h, w)
  neg = dict(negative_prompt_embeds=t(negative["context"]), negative_pooled_prompt_embeds=t(negative["pooled"])) \
      if negative is not None else {}
  with torch.no_grad():
    out = pipe(prompt_embeds=t(cond["context"]), pooled_prompt_embeds=t(cond["pooled"]), height=8 * h, width=8 * w,
               latents=packed, num_inference_steps=steps, guidance_scale=guidance_scale,
               true_cfg_scale=true_cfg_scale, output_type="latent", **neg).images
  return FluxPipeline._unpack_latents(out, 8 * h, 8 * w, 8).numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("resolution", RESOLUTIONS, ids=lambda r: f"{r[0]}x{r[1]}")
@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_preset_matches_pipeline(models, variant, resolution):
  """Both flavours of each preset against FluxPipeline at its preset's steps and guidance."""
  ref, ours = models[variant]
  x_T, cond = _noise(2, *resolution, seed=1), _text(2, 2)
  steps = 4 if variant == "schnell" else 6
  expected = _pipeline_latents(ref, variant, x_T, cond, steps, 3.5)
  for flavour in ("diffusers", "reference"):
    p = load_preset(f"flux_{variant}:{flavour}")
    latents = sample(ours, cond, method=p.method, steps=steps, cfg_scale=p.cfg_scale, shift=p.shift,
                     guidance=p.guidance, schedule=p.schedule, latent_size=resolution, noise=x_T)
    err = rel_err(latents, expected)
    assert latents.shape == expected.shape and err <= 1e-4, \
        f"flux_{variant}:{flavour} {resolution} vs FluxPipeline: {err:.2e}"


def test_true_cfg_matches_pipeline(models):
  """diffusers' true CFG: a negative pass with the same guidance input, neg + s (pos - neg)."""
  ref, ours = models["dev"]
  x_T, cond, negative = _noise(2, 6, 10, seed=3), _text(2, 4), _text(2, 5)
  expected = _pipeline_latents(ref, "dev", x_T, cond, 4, 2.5, negative=negative, true_cfg_scale=3.0)
  latents = sample(ours, cond, steps=4, cfg_scale=3.0, negative=negative, guidance=2.5, latent_size=(6, 10),
                   noise=x_T)
  err = rel_err(latents, expected)
  assert err <= 1e-4, f"true CFG 3 vs FluxPipeline: {err:.2e}"


@pytest.mark.parametrize("tokens", [16, 1024, 4080, 4096])
@pytest.mark.parametrize("steps", [4, 28])
def test_schedules_match_diffusers_scheduler(tokens, steps):
  """Both flavours equal FlowMatchEulerDiscreteScheduler's sigmas (dynamic shifting at the pipeline's mu)."""
  from diffusers.pipelines.flux.pipeline_flux import calculate_shift

  scheduler = _scheduler("dev")
  mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
  assert mu == pytest.approx(flow.dynamic_shift_mu(tokens), abs=1e-12)
  scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
  expected = scheduler.sigmas.numpy()
  for flavour in flow.FLUX_SCHEDULES:
    ours = flow.flux_sigmas(steps, flow.dynamic_shift_mu(tokens), flavour=flavour)
    err = np.abs(ours - expected).max()
    assert ours.shape == (steps + 1,) and err <= 1e-6, f"{flavour} schedule, {tokens} tokens: {err:.2e}"


def test_reference_schedule_worked_values():
  """BFL get_schedule: mu 1.15 at 1024x1024 (4096 tokens), about 1.147 at 1360x768 (4080); schnell unshifted."""
  assert flow.dynamic_shift_mu(1024 * 1024 // 256) == pytest.approx(1.15)
  assert flow.dynamic_shift_mu(1360 * 768 // 256) == pytest.approx(1.147, abs=5e-4)
  assert flow.flux_sigmas(4, flavour="reference").tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
  shifted = flow.flux_sigmas(4, 1.15, flavour="reference")
  e = np.exp(1.15)
  assert np.allclose(shifted, [1.0, e / (e + 1 / 3), e / (e + 1), e / (e + 3), 0.0], atol=1e-7), shifted


def test_errors(models):
  _, dev = models["dev"]
  _, schnell = models["schnell"]
  cond = _text(1, 0)
  cases = [
      (schnell, dict(guidance=3.5), "no guidance embedder"),
      (dev, dict(schedule="karras"), "unknown FLUX schedule"),
      (dev, dict(latent_size=(7, 8)), "even"),
      (dev, dict(method="ddpm"), "FLUX samples with"),
      (dev, dict(skip_layer_guidance=dict(layers=[0], scale=1.0)), "for MMDiT"),
      (dev, dict(guidance=float("nan")), "guidance must be"),
  ]
  for model, kw, message in cases:
    with pytest.raises(ValueError, match=message):
      sample(model, cond, steps=2, latent_size=kw.pop("latent_size", (4, 4)), noise=None,
             key=jax.random.key(0), **kw)
  with pytest.raises(ValueError, match="FLUX model is conditioned on text embeddings"):
    sample(dev, np.array([1]), steps=2, key=jax.random.key(0))


def test_sample_cli_preset_and_cond(models, tmp, capsys):
  """sample.py --preset flux_dev --cond cond.npz on a saved FLUX checkpoint: the latents dit_jax.sample gives with the
  preset's settings (explicit --steps / --guidance override it); one-line errors for FLUX-only flags."""
  import dit_jax

  _, ours = models["dev"]
  dit_jax.save(ours, tmp / "ckpt")
  cond = _text(2, 6)
  np.savez(tmp / "cond.npz", **cond)
  args = ["--checkpoint", tmp / "ckpt", "--cond", tmp / "cond.npz", "--preset", "flux_dev:reference", "--steps", "3",
          "--guidance", "2.0", "--latent-size", "4,6", "--seed", "2"]
  code, err = main_in_process("sample.py", [*args, "--out", tmp / "s.npz"], capsys)
  assert code == 0, err
  latents = np.load(tmp / "s.npz")["latents"]
  expected = sample(dit_jax.load(tmp / "ckpt"), cond, jax.random.fold_in(jax.random.key(2), 0), steps=3,
                    guidance=2.0, schedule="reference", latent_size=(4, 6))
  np.testing.assert_allclose(latents, expected, rtol=0, atol=1e-6)
  for extra, fragment in ((["--slg-layers", "0", "--slg-scale", "1"], "for MMDiT"),
                          (["--schedule", "bfl"], "invalid choice"),
                          (["--guidance", "-1"], "--guidance must be"),
                          (["--prompt", "a cat"], "give exactly one")):
    code, err = main_in_process("sample.py", [*args, *extra, "--out", tmp / "bad.npz"], capsys)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
  assert not (tmp / "bad.npz").exists()
