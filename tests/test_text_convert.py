"""SD3 text encoders through tools/convert_torch.py from every source a user has: Stability's separate files
(--text-encoders, an fp16 T5), an SD3 single file's ``text_encoders.*`` keys, OpenCLIP's native CLIP-G layout; each
bundle bit-exact against the pipeline-folder conversion of the same weights. Then the one-line errors (nothing
written), --no-text-encoders, export back to torch keys, and the peak memory of a ~480 MiB fp16 T5 conversion.

The CLIPs have the released widths (768 / 1280, 64-wide heads): without a config.json, that is what config
inference reads the heads and activation from. Depth and MLP are tiny, and T5 is 2048 wide (= 768 + 1280, the
MMDiT's joint_attention_dim) with tiny heads."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import dit_jax
from dit_jax.checkpoint import flat_params, read_meta
from dit_jax.convert.files import convert
from tests.helpers.clip_reference import hf_clip, hf_state_dict, openclip_state_dict
from tests.helpers.processes import conversion_peak, device_env, one_line_error, run_cli
from tests.helpers.reference import SD3_VARIANTS, diffusers_dit, diffusers_sd3, stability_state_dict
from tests.helpers.t5_reference import T5_TINY, hf_t5, t5_state_dict
from tests.helpers.tokenizer_files import bpe_gz, write_pipeline_tokenizers
from tools.convert_torch import main as cli

pytestmark = pytest.mark.skipif(bpe_gz() is None, reason="open-clip-torch (CLIP's vocabulary) is not installed")

VOCAB = 49408  # CLIP's: its EOS id 49407 must be in the vocabulary
CLIP_L = dict(vocab_size=VOCAB, hidden_size=768, intermediate_size=64, num_hidden_layers=1, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)
CLIP_G = dict(CLIP_L, hidden_size=1280, num_attention_heads=20, hidden_act="gelu", projection_dim=32)
T5 = dict(vocab_size=128, d_model=2048, d_kv=8, d_ff=32, num_layers=2, num_heads=4)
# Stability's shape rule (hidden = 64 * depth) so the single file's heads are inferred; joint / pooled widths fit
# the encoders above.
MMDIT = dict(num_layers=2, attention_head_dim=64, num_attention_heads=2, caption_projection_dim=128, in_channels=16,
             out_channels=16, joint_attention_dim=768 + 1280, pooled_projection_dim=768 + 32)
NAMES = ("clip_l", "clip_g", "t5xxl")
SINGLE = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
          "t5xxl": "text_encoders.t5xxl.transformer."}


def _numpy(state: dict) -> dict[str, np.ndarray]:
  return {k: np.ascontiguousarray(v) for k, v in state.items()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """The same weights as a pipeline folder (pipe/, fp32), Stability's separate fp16 files (stability/: clip_l,
  clip_g, t5xxl_fp16), a Stability MMDiT single file without (sd3.safetensors) and with text_encoders.*
  (sd3_te.safetensors, fp16 encoders). states: the fp32 (pipeline) and fp16 (Stability) key -> array dicts."""
  root = tmp_path_factory.mktemp("text_sources")
  pipe, stab = root / "pipe", root / "stability"
  write_pipeline_tokenizers(pipe)
  clip_l, clip_g, t5 = hf_clip(CLIP_L, projection=True, seed=1), hf_clip(CLIP_G, projection=True, seed=2), hf_t5(T5, 3)
  with torch.no_grad():  # fp16-representable, so the fp16 files hold the very weights the pipeline folder has
    for model in (clip_l, clip_g, t5):
      for p in model.parameters():
        p.copy_(p.half().float())
  mmdit = diffusers_sd3(seed=4, **MMDIT, **SD3_VARIANTS["sd3-medium"])
  for name, model in dict(text_encoder=clip_l, text_encoder_2=clip_g, text_encoder_3=t5, transformer=mmdit).items():
    model.save_pretrained(pipe / name)
  fp32 = {"clip_l": hf_state_dict(clip_l), "clip_g": hf_state_dict(clip_g),
          "t5xxl": {k: v for k, v in t5_state_dict(t5).items() if k != "encoder.embed_tokens.weight"}}
  states = {n: {k: v.astype(np.float16) for k, v in fp32[n].items()} for n in NAMES}
  stab.mkdir()
  for name, file in zip(NAMES, ("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors")):
    save_file(_numpy(states[name]), stab / file)
  body = stability_state_dict({k: v.numpy() for k, v in mmdit.state_dict().items()}, MMDIT["num_layers"])
  save_file(_numpy(body), root / "sd3.safetensors")
  text = {SINGLE[n] + k: v for n in NAMES for k, v in states[n].items()}
  save_file(_numpy(body | text), root / "sd3_te.safetensors")
  return dict(root=root, pipe=pipe, stab=stab, single=root / "sd3.safetensors", single_te=root / "sd3_te.safetensors",
              states=states, fp32=fp32)


@pytest.fixture(scope="module")
def reference(sources, tmp_path_factory):
  """The pipeline folder converted: the bundle every other source must reproduce."""
  out = tmp_path_factory.mktemp("ref") / "sd3"
  convert(sources["pipe"], out)
  return out


@functools.lru_cache(maxsize=4)
def _params(folder) -> dict:
  return flat_params(dit_jax.checkpoint.load(folder))


def _same_bundle(ours, ref, names=NAMES) -> None:
  """Each encoder: same kind and config, bit-identical parameters, identical tokenizer files."""
  for name in names:
    a, b = ours / "text_encoders" / name, ref / "text_encoders" / name
    meta_a, meta_b = read_meta(a), read_meta(b)
    assert (meta_a["kind"], meta_a["config"]) == (meta_b["kind"], meta_b["config"]), name
    pa, pb = flat_params(dit_jax.checkpoint.load(a)), _params(b)
    assert pa.keys() == pb.keys(), name
    differ = [k for k in pa if not np.array_equal(pa[k], pb[k])]
    assert not differ, f"{name}: {len(differ)} parameters differ from the pipeline-folder conversion, e.g. {differ[0]}"
    files = sorted(p.name for p in (a / "tokenizer").iterdir())
    assert files == sorted(p.name for p in (b / "tokenizer").iterdir()) and files, name
    assert all((a / "tokenizer" / f).read_bytes() == (b / "tokenizer" / f).read_bytes() for f in files), name


@pytest.fixture(scope="module")
def stability(sources, tmp_path_factory):
  """The MMDiT single file converted with --text-encoders (Stability's files) --tokenizers (the pipeline's)."""
  out = tmp_path_factory.mktemp("stab") / "sd3"
  assert cli([str(sources["single"]), str(out), "--text-encoders", str(sources["stab"]), "--tokenizers",
              str(sources["pipe"])]) == 0
  return out


def test_stability_separate_files_equal_pipeline_folder(stability, reference):
  out = stability
  _same_bundle(out, reference)
  for name in NAMES:
    meta = read_meta(out / "text_encoders" / name)["source"]
    assert (meta["dtype"], meta["layout"]) == ("float16", "hf") and meta["path"].endswith(".safetensors"), meta
  assert read_meta(out / "text_encoders" / "clip_g")["config"]["hidden_act"] == "gelu"  # from the width alone
  encoders = dit_jax.load_text_encoders(out)
  encoders.check_fits(MMDIT["joint_attention_dim"], MMDIT["pooled_projection_dim"])


def test_single_file_text_encoders(sources, reference, tmp, capsys):
  out = tmp / "sd3"
  assert cli([str(sources["single_te"]), str(out), "--tokenizers", str(sources["pipe"])]) == 0
  assert "text encoders (clip_g, clip_l, t5xxl) with their tokenizers" in capsys.readouterr().out
  _same_bundle(out, reference)
  encoders = dit_jax.load_text_encoders(out)
  assert encoders.t5 is not None and set(encoders.tokenizers) == {"clip_l", "clip_g", "t5"}
  # without --tokenizers: one line naming the flag, and nothing written
  one_line_error(cli([str(sources["single_te"]), str(tmp / "none")]), capsys.readouterr().err, "--tokenizers")
  assert not (tmp / "none").exists()


def test_openclip_clip_g(sources, reference, tmp):
  """clip_g as open_clip_pytorch_model.safetensors (with the image tower and logit_scale, ignored)."""
  folder = tmp / "encoders"
  folder.mkdir()
  (folder / "clip_l.safetensors").symlink_to(sources["stab"] / "clip_l.safetensors")
  rng = np.random.default_rng(0)
  oc = openclip_state_dict(sources["fp32"]["clip_g"])
  oc |= {"visual.conv1.weight": rng.standard_normal((8, 3, 4, 4)).astype(np.float32),
         "visual.proj": rng.standard_normal((8, 32)).astype(np.float32),
         "visual.transformer.resblocks.0.attn.in_proj_weight": rng.standard_normal((24, 8)).astype(np.float32)}
  assert "logit_scale" in oc
  save_file(_numpy(oc), folder / "open_clip_pytorch_model.safetensors")
  out = tmp / "sd3"
  assert cli([str(sources["single"]), str(out), "--text-encoders", str(folder), "--tokenizers",
              str(sources["pipe"])]) == 0
  _same_bundle(out, reference, names=("clip_l", "clip_g"))
  assert read_meta(out / "text_encoders" / "clip_g")["source"]["layout"] == "openclip"
  assert not (out / "text_encoders" / "t5xxl").exists()  # T5 is optional


@pytest.fixture(scope="module")
def bad_sources(sources, tmp_path_factory):
  """name -> (SRC and the arguments after OUT, fragment of the one-line error)."""
  root = tmp_path_factory.mktemp("bad")
  stab, single = sources["stab"], str(sources["single"])

  def folder(name, *linked, **files):
    """A --text-encoders folder: Stability's ``linked`` files and new ``files``."""
    (root / name).mkdir()
    for file in linked:
      (root / name / file).symlink_to(stab / file)
    for file, tensors in files.items():
      save_file(_numpy(tensors), root / name / f"{file}.safetensors")
    return str(root / name)

  clips = ("clip_l.safetensors", "clip_g.safetensors")
  body = load_file(sources["single"])
  key = "model.diffusion_model.y_embedder.mlp.0.weight"
  save_file(dict(body, **{key: np.ascontiguousarray(body[key][:, :784])}), root / "pooled784.safetensors")
  nan_t5 = dict(sources["states"]["t5xxl"])
  nan_key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
  nan_t5[nan_key] = nan_t5[nan_key].copy()
  nan_t5[nan_key][3, 5] = np.nan
  diffusers_dit(depth=1).save_pretrained(root / "dit")
  toks = ["--tokenizers", str(sources["pipe"])]
  return {
      "one_clip": ([single, "--text-encoders", folder("one", clips[0])] + toks, "found clip_l but not clip_g"),
      "t5_width": ([single, "--text-encoders", folder("t5w", *clips, t5xxl=t5_state_dict(hf_t5(T5_TINY, 6))),
                    *toks], "T5's width 32 does not fit the MMDiT's joint_attention_dim 2048"),
      "pooled": ([str(root / "pooled784.safetensors"), "--text-encoders", str(stab)] + toks,
                 "800-wide pooled vector, the MMDiT's pooled_projection_dim is 784"),
      "dit": ([str(root / "dit"), "--text-encoders", str(stab)], "is not an MMDiT"),
      "contradiction": ([single, "--text-encoders", str(stab), "--no-text-encoders"], "contradict"),
      "empty": ([single, "--text-encoders", folder("empty")], "holds none of clip_l*.safetensors"),
      "nan": ([single, "--text-encoders", folder("nan", *clips, t5xxl_fp16=nan_t5)] + toks,
              f"NaN or Inf values in {nan_key}"),
  }


@pytest.mark.parametrize("case", ["one_clip", "t5_width", "pooled", "dit", "contradiction", "empty", "nan"])
def test_errors_are_one_line_and_write_nothing(bad_sources, case, tmp, capsys):
  (src, *args), fragment = bad_sources[case]
  out = tmp / "out"
  status = cli([src, str(out), *args])
  one_line_error(status, capsys.readouterr().err, fragment)
  assert not out.exists(), f"{case}: {out} was written"


def test_nonfinite_t5_alone_converts_when_allowed(bad_sources, tmp, capsys):
  """The NaN T5 of the 'nan' case on its own: refused, then converted with --allow-nonfinite."""
  (_, _, folder, *_), fragment = bad_sources["nan"]
  src = f"{folder}/t5xxl_fp16.safetensors"
  one_line_error(cli([src, str(tmp / "t5")]), capsys.readouterr().err, fragment)
  assert cli([src, str(tmp / "t5"), "--allow-nonfinite"]) == 0
  assert sum(int(np.isnan(v).sum()) for v in _params(tmp / "t5").values()) == 1


@pytest.mark.slow
def test_nonfinite_bundle_converts_when_allowed(bad_sources, tmp):
  (src, *args), _ = bad_sources["nan"]
  assert cli([src, str(tmp / "out"), *args, "--allow-nonfinite"]) == 0
  assert sum(int(np.isnan(v).sum()) for v in _params(tmp / "out" / "text_encoders" / "t5xxl").values()) == 1


def test_no_text_encoders_then_prompt_sampling_says_how(sources, tmp):
  out = tmp / "sd3"
  convert(sources["pipe"], out, bundle_text_encoders=False)
  assert dit_jax.load(out).config.joint_attention_dim == MMDIT["joint_attention_dim"]
  assert not (out / "text_encoders").exists()
  result = run_cli("sample.py", "--checkpoint", out, "--prompt", "x", "--steps", "1", "--out", tmp / "x.npz",
                   env=device_env(1), timeout=300)
  one_line_error(result.returncode, result.stderr, "--text-encoders DIR")
  assert not (tmp / "x.npz").exists()


def _exported(ckpt, out, *extra) -> dict[str, np.ndarray]:
  assert cli([str(ckpt), str(out), "--to", "torch", *extra]) == 0
  return load_file(out)


def _equal(got: dict, want: dict, what: str) -> None:
  assert got.keys() == want.keys(), f"{what}: keys {sorted(set(got) ^ set(want))[:5]} differ"
  bad = [k for k in want if got[k].dtype != want[k].dtype or got[k].tobytes() != want[k].tobytes()]
  assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[0]}"


def test_export_gives_the_sources_back(sources, stability, tmp):
  states = sources["states"]
  for name in NAMES:  # hf layout (the default), in the source's fp16
    _equal(_exported(stability / "text_encoders" / name, tmp / f"{name}_16.safetensors"), states[name], f"{name} fp16")
  # a CLIP file on its own -> clip_text checkpoint -> OpenCLIP keys
  alone = tmp / "clip_g"
  assert cli([str(sources["stab"] / "clip_g.safetensors"), str(alone)]) == 0
  assert read_meta(alone)["kind"] == "clip_text" and not (alone / "text_encoders").exists()
  _equal(_exported(alone, tmp / "oc.safetensors", "--layout", "openclip"),
         openclip_state_dict(states["clip_g"], logit_scale=False), "clip_g openclip")


# ---- streaming: peak memory of a T5 converted on its own

HEADROOM = 2 << 30  # the bound: peak memory at most the output size plus 2 GB
STREAM_T5 = dict(vocab=256, d_model=2048, d_ff=5120, layers=5, heads=32, d_kv=64, buckets=32)


def synthetic_t5(path, vocab, d_model, d_ff, layers, heads, d_kv, buckets) -> int:
  """An fp16 transformers T5EncoderModel state dict (values tiled from a random block) saved as safetensors;
  returns the bytes of its fp32 parameters."""
  block = (np.random.default_rng(0).standard_normal(1 << 20) * 0.02).astype(np.float16)
  inner = heads * d_kv
  shapes = {"shared.weight": (vocab, d_model), "encoder.final_layer_norm.weight": (d_model,),
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (buckets, heads)}
  for i in range(layers):
    b = f"encoder.block.{i}.layer"
    shapes |= {f"{b}.0.layer_norm.weight": (d_model,), f"{b}.1.layer_norm.weight": (d_model,),
               f"{b}.0.SelfAttention.o.weight": (d_model, inner), f"{b}.1.DenseReluDense.wo.weight": (d_model, d_ff)}
    shapes |= {f"{b}.0.SelfAttention.{n}.weight": (inner, d_model) for n in "qkv"}
    shapes |= {f"{b}.1.DenseReluDense.{n}.weight": (d_ff, d_model) for n in ("wi_0", "wi_1")}
  save_file({k: np.resize(block, s) for k, s in shapes.items()}, str(path))
  return sum(int(np.prod(s)) * 4 for s in shapes.values())


def test_fp16_t5_conversion_streams(tmp):
  src = tmp / "t5xxl_fp16.safetensors"
  out_bytes = synthetic_t5(src, **STREAM_T5)
  rise = conversion_peak(src, tmp / "ckpt")
  report = (f"fp16 T5 of {src.stat().st_size / 2**20:.0f} MiB converted: peak RSS {rise / 2**20:.0f} MiB above the "
            f"baseline, fp32 output {out_bytes / 2**20:.0f} MiB, bound {(out_bytes + HEADROOM) / 2**20:.0f} MiB")
  print("\n" + report)
  assert rise <= out_bytes + HEADROOM, report
  meta = read_meta(tmp / "ckpt")
  assert meta["kind"] == "t5_encoder" and meta["source"]["dtype"] == "float16", meta
  assert (meta["config"]["d_model"], meta["config"]["num_layers"]) == (2048, STREAM_T5["layers"])
