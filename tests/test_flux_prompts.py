"""FLUX.1 from prompts end to end against diffusers' FluxPipeline: a tiny random FluxPipeline (transformers
CLIPTextModel and T5EncoderModel with CLIP's real vocabulary and a trained SentencePiece T5 tokenizer, a tiny
FluxTransformer2DModel, no VAE) saved with save_pretrained, converted by tools/convert_torch.py (text encoders
bundled as text_encoders/{clip_l,t5xxl}); encode_prompt(family="flux") equals pipeline.encode_prompt, sampling from
prompts equals pipeline(...) (with and without true CFG), sample.py samples from prompts; one-line errors."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import dit_jax
from dit_jax.presets import load_preset
from tests.helpers import rel_err
from tests.helpers.clip_reference import CLIP_TINY_L, hf_clip
from tests.helpers.flux_reference import diffusers_flux
from tests.helpers.processes import main_in_process, one_line_error
from tests.helpers.t5_reference import hf_t5
from tests.helpers.tokenizer_files import EOS, bpe_gz, clip_vocab_and_merges, train_spiece, write_clip
from tools.convert_torch import main as convert_cli

pytestmark = pytest.mark.skipif(bpe_gz() is None, reason="open-clip-torch (CLIP's vocabulary) is not installed")

WIDTH = 32  # CLIP-L's hidden size = the FLUX pooled_projection_dim; T5's d_model = joint_attention_dim
T5 = dict(vocab_size=1104, d_model=WIDTH, d_kv=8, d_ff=48, num_layers=2, num_heads=4)  # 1000 pieces + 100 extra ids
LATENT = (6, 10)
PROMPTS = ["a photo of a corgi in a spacesuit, highly detailed!",
           "東京の夜景 with neon lights 🌃 " + "and very long descriptions of everything " * 12]
NEGATIVE = ["blurry", ""]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  """(folder, diffusers FluxPipeline of a schnell-like tiny FLUX), saved by FluxPipeline.save_pretrained."""
  from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
  from transformers import CLIPTokenizer, T5TokenizerFast

  files = tmp_path_factory.mktemp("tokenizer_files")
  write_clip(files / "clip", *clip_vocab_and_merges(bpe_gz()), pad=EOS)
  train_spiece(files / "t5")
  pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False), vae=None,
                      text_encoder=hf_clip(CLIP_TINY_L, projection=False, seed=1),
                      tokenizer=CLIPTokenizer.from_pretrained(files / "clip"), text_encoder_2=hf_t5(T5, seed=2),
                      tokenizer_2=T5TokenizerFast.from_pretrained(files / "t5"),
                      transformer=diffusers_flux(seed=3, guidance_embeds=False, joint_attention_dim=WIDTH,
                                                 pooled_projection_dim=CLIP_TINY_L["hidden_size"]))
  pipe.set_progress_bar_config(disable=True)
  root = tmp_path_factory.mktemp("flux_pipeline")
  pipe.save_pretrained(root)
  return root, pipe


@pytest.fixture(scope="module")
def converted(pipeline, tmp_path_factory):
  """(checkpoint dir, Flux, TextEncoders): the pipeline folder through tools/convert_torch.py."""
  out = tmp_path_factory.mktemp("converted") / "flux"
  assert convert_cli([str(pipeline[0]), str(out)]) == 0
  return out, dit_jax.load(out), dit_jax.load_text_encoders(out)


def test_bundle_holds_clip_l_and_t5(converted, capsys):
  out, model, encoders = converted
  assert sorted(p.name for p in (out / "text_encoders").iterdir()) == ["clip_l", "t5xxl"]
  assert encoders.clip_g is None and encoders.t5 is not None and set(encoders.tokenizers) == {"clip_l", "t5"}
  assert encoders.clip_l.text_projection is None  # CLIPTextModel: FLUX's pooled vector is unprojected
  encoders.check_fits(model.config.joint_attention_dim, model.config.pooled_projection_dim, "flux")


@pytest.mark.parametrize("length", [77, 256])
def test_encode_prompt_matches_pipeline(pipeline, converted, length):
  """prompt_embeds (T5, padded to max_sequence_length, no mask) and pooled_prompt_embeds (CLIP-L pooler output)."""
  _, pipe = pipeline
  with torch.no_grad():
    context, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=length)
  ours = dit_jax.encode_prompt(converted[2], PROMPTS, family="flux", max_sequence_length=length)
  for key, value in (("context", context), ("pooled", pooled)):
    err = rel_err(ours[key], value.numpy())
    assert ours[key].shape == value.shape and err <= 1e-5, f"{key} vs FluxPipeline.encode_prompt: {err:.2e}"


@pytest.mark.parametrize("true_cfg", [1.0, 2.5], ids=["no_cfg", "true_cfg"])
def test_prompt_sampler_matches_pipeline(pipeline, converted, true_cfg):
  """flux_schnell from prompts against pipe(prompt=..., latents=...): FluxPipeline's default 512 T5 tokens, and
  true CFG with negative prompts at 128."""
  from diffusers import FluxPipeline

  _, pipe = pipeline
  _, model, encoders = converted
  b, (h, w) = len(PROMPTS), LATENT
  x_T = np.random.default_rng(5).standard_normal((b, h, w, 4)).astype(np.float32)
  packed = FluxPipeline._pack_latents(torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy()), b, 4, h, w)
  neg = dict(negative_prompt=NEGATIVE, true_cfg_scale=true_cfg, max_sequence_length=128) if true_cfg > 1 else {}
  with torch.no_grad():
    out = pipe(prompt=PROMPTS, height=8 * h, width=8 * w, latents=packed, num_inference_steps=4,
               output_type="latent", **neg).images
  expected = FluxPipeline._unpack_latents(out, 8 * h, 8 * w, 8).numpy().transpose(0, 2, 3, 1)
  p = load_preset("flux_schnell")
  latents = dit_jax.sample(model, PROMPTS, negative=NEGATIVE if true_cfg > 1 else None, encoders=encoders,
                           method=p.method, steps=4, cfg_scale=true_cfg, shift=p.shift, schedule=p.schedule,
                           max_sequence_length=neg.get("max_sequence_length"), latent_size=LATENT, noise=x_T)
  err = rel_err(latents, expected)
  assert latents.shape == expected.shape and err <= 1e-4, f"prompts -> latents vs FluxPipeline: {err:.2e}"


def test_sample_cli_from_prompts(converted, tmp, capsys):
  """sample.py --prompt ... --preset flux_schnell: the latents dit_jax.sample gives from the same prompts, and the
  prompts stored in the npz."""
  ckpt, model, encoders = converted
  args = ["--checkpoint", ckpt, "--prompt", PROMPTS[0], "--prompt", "three cats", "--preset", "flux_schnell",
          "--max-sequence-length", "64", "--latent-size", "4,6", "--seed", "3", "--out", tmp / "s.npz"]
  code, err = main_in_process("sample.py", args, capsys)
  assert code == 0, err
  with np.load(tmp / "s.npz") as f:
    assert f["prompts"].tolist() == [PROMPTS[0], "three cats"]
    latents = f["latents"]
  p = load_preset("flux_schnell")
  expected = dit_jax.sample(model, [PROMPTS[0], "three cats"], jax.random.fold_in(jax.random.key(3), 0),
                            encoders=encoders, method=p.method, steps=p.steps, cfg_scale=p.cfg_scale, shift=p.shift,
                            schedule=p.schedule, max_sequence_length=64, latent_size=(4, 6))
  np.testing.assert_allclose(latents, expected, rtol=0, atol=1e-6)


def test_cli_errors(pipeline, converted, tmp, capsys):
  ckpt = converted[0]
  bare = tmp / "bare"
  assert convert_cli([str(pipeline[0]), str(bare), "--no-text-encoders"]) == 0
  base = ["--prompt", "a cat", "--steps", "1", "--latent-size", "4,4", "--out", tmp / "x.npz"]
  for checkpoint, extra, fragment in [
      (bare, [], "--text-encoders DIR"),
      (ckpt, ["--max-sequence-length", "600"], "max_sequence_length must be an integer in 1..512"),
      (ckpt, ["--profile", "sd35_reference"], "--profile is for MMDiT checkpoints")]:
    code, err = main_in_process("sample.py", ["--checkpoint", checkpoint, *base, *extra], capsys)
    one_line_error(code, err, fragment)
  assert not (tmp / "x.npz").exists()


def test_converter_errors(pipeline, tmp, capsys):
  """--text-encoders with a T5 of the wrong width, or CLIP-L alone: one line, nothing written."""
  root, _ = pipeline
  wide, alone = tmp / "wide", tmp / "alone"
  for folder in (wide, alone):
    folder.mkdir()
    (folder / "text_encoder").symlink_to(root / "text_encoder")
  hf_t5(dict(T5, d_model=48), seed=4).save_pretrained(wide / "text_encoder_2")
  capsys.readouterr()  # save_pretrained's progress bar
  transformer = str(root / "transformer")
  for folder, fragment in ((wide, "T5's width 48 does not fit the FLUX transformer's joint_attention_dim 32"),
                           (alone, "found clip_l but not t5xxl: FLUX needs CLIP-L and T5")):
    out = tmp / f"out_{folder.name}"
    status = convert_cli([transformer, str(out), "--text-encoders", str(folder), "--tokenizers", str(root)])
    one_line_error(status, capsys.readouterr().err, fragment)
    assert not out.exists()


def test_api_errors(converted):
  _, model, encoders = converted
  no_t5 = dit_jax.TextEncoders(encoders.clip_l, None, None, {"clip_l": encoders.tokenizers["clip_l"]})
  cases = [
      (lambda: dit_jax.encode_prompt(no_t5, "a cat", family="flux"), "FLUX prompts need T5"),
      (lambda: dit_jax.encode_prompt(encoders, "a cat"), "SD3 prompts need CLIP-G"),
      (lambda: dit_jax.encode_prompt(encoders, "a cat", family="flux", max_sequence_length=513),
       "max_sequence_length must be an integer in 1..512"),
      (lambda: dit_jax.encode_prompt(encoders, "a cat", family="flux", clip_skip=1), "clip_skip=1 is for SD3"),
      (lambda: dit_jax.encode_prompt(encoders, "a cat", family="sdxl"), "unknown text-encoder family"),
      (lambda: encoders.check_fits(64, WIDTH, "flux"), "the FLUX model's joint_attention_dim is 64"),
      (lambda: encoders.check_fits(WIDTH, 16, "flux"), "the FLUX model's pooled_projection_dim is 16"),
      (lambda: dit_jax.sample(model, ["a cat"], jax.random.key(0), steps=1, latent_size=(4, 4)),
       "needs the text encoders"),
  ]
  for call, fragment in cases:
    with pytest.raises(ValueError, match=fragment):
      call()
