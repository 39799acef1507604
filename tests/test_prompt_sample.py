"""Prompt -> latents end to end against diffusers' StableDiffusion3Pipeline: a tiny random SD3 pipeline folder (CLIP-L
and CLIP-G with projection and CLIP's real vocabulary, a T5 with a trained SentencePiece model, an MMDiT) is saved as
diffusers / transformers write it, converted by tools/convert_torch.py, and sampled from the same prompts and
initial latent: encode_prompt equals pipeline.encode_prompt, the sampler equals pipeline(...), with and without T5;
then sample.py samples the converted folder from a prompt without importing torch."""
from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

import dit_jax
from dit_jax.convert.files import convert
from tests.helpers import REPO_ROOT, rel_err
from tests.helpers.clip_reference import CLIP_TINY_G, CLIP_TINY_L, hf_clip
from tests.helpers.processes import one_line_error
from tests.helpers.reference import SD3_VARIANTS, diffusers_sd3
from tests.helpers.t5_reference import hf_t5
from tests.helpers.tokenizer_files import bpe_gz, transformers_tokenizers, write_pipeline_tokenizers

pytestmark = pytest.mark.skipif(bpe_gz() is None, reason="open-clip-torch (CLIP's vocabulary) is not installed")

CLIP_L = dict(CLIP_TINY_L, projection_dim=CLIP_TINY_L["hidden_size"])  # SD3's CLIP-L projects to its own width
T5 = dict(vocab_size=1104, d_model=128, d_kv=16, d_ff=96, num_layers=2, num_heads=4)  # 1000 pieces + 100 extra ids
POOLED = CLIP_L["hidden_size"] + CLIP_TINY_G["projection_dim"]
LATENT = (8, 12)
PROMPTS = ["a photo of a corgi in a spacesuit, (highly detailed:1.2)!",
           "東京の夜景 with neon lights 🌃 " + "and very long descriptions of everything " * 6]
NEGATIVE = ["blurry", ""]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  """(folder, diffusers StableDiffusion3Pipeline with T5, the same without T5), saved as diffusers lays it out."""
  from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

  root = tmp_path_factory.mktemp("sd3_pipeline")
  write_pipeline_tokenizers(root)
  parts = dict(text_encoder=hf_clip(CLIP_L, projection=True, seed=1),
               text_encoder_2=hf_clip(CLIP_TINY_G, projection=True, seed=2), text_encoder_3=hf_t5(T5, seed=3),
               transformer=diffusers_sd3(seed=4, joint_attention_dim=T5["d_model"], pooled_projection_dim=POOLED,
                                         **SD3_VARIANTS["sd3.5-medium"]))
  for name, model in parts.items():
    model.save_pretrained(root / name)
  toks = transformers_tokenizers(root)
  common = dict(transformer=parts["transformer"], scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
                text_encoder=parts["text_encoder"], tokenizer=toks["clip_l"], text_encoder_2=parts["text_encoder_2"],
                tokenizer_2=toks["clip_g"])
  with_t5 = StableDiffusion3Pipeline(**common, text_encoder_3=parts["text_encoder_3"], tokenizer_3=toks["t5"])
  without_t5 = StableDiffusion3Pipeline(**common, text_encoder_3=None, tokenizer_3=None)
  for pipe in (with_t5, without_t5):
    pipe.set_progress_bar_config(disable=True)
  return root, with_t5, without_t5


@pytest.fixture(scope="module")
def converted(pipeline, tmp_path_factory):
  """(checkpoint dir, MMDiT, TextEncoders) converted from the pipeline folder."""
  out = tmp_path_factory.mktemp("converted") / "sd3"
  convert(pipeline[0], out)
  return out, dit_jax.load(out), dit_jax.load_text_encoders(out)


def _no_t5(encoders):
  return dit_jax.TextEncoders(encoders.clip_l, encoders.clip_g, None,
                              {k: v for k, v in encoders.tokenizers.items() if k != "t5"})


@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no_t5"])
def test_encode_prompt_matches_pipeline(pipeline, converted, t5):
  _, with_t5, without_t5 = pipeline
  pipe, encoders = (with_t5, converted[2]) if t5 else (without_t5, _no_t5(converted[2]))
  with torch.no_grad():
    ctx, neg_ctx, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, negative_prompt=NEGATIVE,
                                                          do_classifier_free_guidance=True, max_sequence_length=256)
  ours = dit_jax.encode_prompt(encoders, PROMPTS, negative=NEGATIVE, context_dim=T5["d_model"])
  expected = dict(context=ctx, pooled=pooled, negative_context=neg_ctx, negative_pooled=neg_pooled)
  for key, value in expected.items():
    err = rel_err(ours[key], value.numpy())
    assert ours[key].shape == value.shape and err <= 1e-5, f"{key} vs pipeline.encode_prompt: {err:.2e}"


@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no_t5"])
def test_prompt_sampler_matches_pipeline(pipeline, converted, t5):
  _, with_t5, without_t5 = pipeline
  _, mmdit, encoders = converted
  pipe, encoders = (with_t5, encoders) if t5 else (without_t5, _no_t5(encoders))
  x_T = np.random.default_rng(5).standard_normal((2, *LATENT, 4)).astype(np.float32)
  with torch.no_grad():
    expected = pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, height=8 * LATENT[0], width=8 * LATENT[1],
                    latents=torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy()), num_inference_steps=4,
                    guidance_scale=5.0, output_type="latent").images.numpy().transpose(0, 2, 3, 1)
  latents = dit_jax.sample(mmdit, PROMPTS, negative=NEGATIVE, encoders=encoders, method="euler", steps=4,
                           cfg_scale=5.0, shift=3.0, latent_size=LATENT, noise=x_T)
  err = rel_err(latents, expected)
  assert latents.shape == expected.shape and err <= 1e-4, f"prompts -> latents vs StableDiffusion3Pipeline: {err:.2e}"


def test_sd35_reference_profile_against_the_upstream_encoders(pipeline, converted):
  """Stability's assembly from transformers' own encoders on this profile's token ids: CLIP-L pooled unprojected,
  T5 unpadded to 77 tokens, and the error when prompts and negatives differ in T5 length."""
  from dit_jax.text.tokenizers import tokenize

  _, pipe, _ = pipeline
  encoders = converted[2]
  prompts = ["a red cube (glossy:1.3)", "three cats\non a sofa"]
  ids = {k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in
         tokenize(encoders.tokenizers, prompts, profile="sd35_reference").items() if k != "truncated"}
  with torch.no_grad():
    l_out = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)(ids["clip_l"], output_hidden_states=True)
    g_out = pipe.text_encoder_2(ids["clip_g"], output_hidden_states=True)
    t5 = pipe.text_encoder_3(ids["t5"]).last_hidden_state
  clip = torch.cat([l_out.hidden_states[-2], g_out.hidden_states[-2]], -1)
  expected = dict(context=torch.cat([torch.nn.functional.pad(clip, (0, T5["d_model"] - clip.shape[-1])), t5], 1),
                  pooled=torch.cat([l_out.pooler_output, g_out.text_embeds], -1))
  ours = dit_jax.encode_prompt(encoders, prompts, profile="sd35_reference")
  assert ours["context"].shape == (2, 77 + 77, T5["d_model"])
  for key, value in expected.items():
    err = rel_err(ours[key], value.numpy())
    assert err <= 1e-5, f"sd35_reference {key} vs transformers' encoders: {err:.2e}"
  with pytest.raises(ValueError, match="equal lengths"):
    dit_jax.encode_prompt(encoders, ["a " * 90], negative="", profile="sd35_reference")


def test_prompt_errors(converted):
  _, mmdit, encoders = converted
  with pytest.raises(ValueError, match="prompts is empty"):
    dit_jax.encode_prompt(encoders, [])
  with pytest.raises(ValueError, match="profile"):
    dit_jax.encode_prompt(encoders, "a cat", profile="comfy")
  with pytest.raises(ValueError, match="max_sequence_length"):
    dit_jax.encode_prompt(encoders, "a cat", max_sequence_length=513)
  with pytest.raises(ValueError, match="2 negative prompts for 3 prompts"):
    dit_jax.encode_prompt(encoders, ["a", "b", "c"], negative=["x", "y"])
  with pytest.raises(ValueError, match="needs the text encoders"):
    dit_jax.sample(mmdit, ["a cat"], jax.random.key(0), steps=1)


def test_sample_cli_from_prompts_without_torch(converted, tmp_path):
  """sample.py on the converted folder: prompts in, an npz with the prompts out; torch never imported."""
  ckpt = converted[0]
  (tmp_path / "prompts.txt").write_text("a red cube\n\nA blue sphere (glossy:1.3)\nthree cats\n", encoding="utf-8")
  out = tmp_path / "s.npz"
  code = ("import runpy, sys; sys.argv = sys.argv[1:]\n"
          "try:\n  runpy.run_path(sys.argv[0], run_name='__main__')\n"
          "except SystemExit as e:\n  assert not e.code, e.code\n"
          "assert 'torch' not in sys.modules, 'torch was imported'\nprint('no torch')\n")
  cmd = [sys.executable, "-c", code, str(REPO_ROOT / "sample.py"), "--checkpoint", str(ckpt), "--prompts",
         str(tmp_path / "prompts.txt"), "--negative-prompt", "blurry", "--steps", "2", "--batch-size", "2",
         "--latent-size", "8,8", "--out", str(out)]
  result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
  assert result.returncode == 0 and "no torch" in result.stdout, result.stderr[-3000:]
  with np.load(out) as f:
    assert f["prompts"].tolist() == ["a red cube", "A blue sphere (glossy:1.3)", "three cats"]
    assert f["latents"].shape == (3, 8, 8, 4) and np.isfinite(f["latents"]).all()
  base = [sys.executable, str(REPO_ROOT / "sample.py"), "--checkpoint", str(ckpt), "--steps", "1", "--out",
          str(tmp_path / "x.png")]
  (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
  for extra, fragment in [(["--prompts", str(tmp_path / "empty.txt")], "holds no prompts"),
                          (["--prompts", str(tmp_path / "nope.txt")], "not found"),
                          (["--prompt", "a", "--profile", "comfy"], "invalid choice"),
                          (["--prompt", "a", "--max-sequence-length", "0"], "max_sequence_length"),
                          (["--prompt", "a", "--cond", "c.npz"], "give exactly one"),
                          (["--cond", "c.npz", "--negative-prompt", "x"], "goes with --prompt")]:
    result = subprocess.run(base + extra, capture_output=True, text=True, cwd=REPO_ROOT)
    one_line_error(result.returncode, result.stderr, fragment)
