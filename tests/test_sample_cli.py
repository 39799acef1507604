"""sample.py: PNG grid and ADM .npz output, determinism, resume after interruption, one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import dit_jax
from dit_jax import sample_files
from dit_jax.convert.files import convert
from tests.helpers.processes import main_in_process, one_line_error, run_cli
from tests.helpers.reference import diffusers_dit


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("ckpt")
  diffusers_dit(depth=1, sample_size=8, num_classes=10, heads=2, head_dim=16).save_pretrained(tmp / "dit")
  convert(tmp / "dit", tmp / "ckpt")
  return tmp / "ckpt"


def _run(*args):
  return run_cli("sample.py", *args)


def test_png_grid_is_written_and_reproducible(ckpt, tmp):
  args = ["--checkpoint", ckpt, "--class-labels", "1,2,3,10", "--method", "ddim", "--steps", "5",
          "--cfg-scale", "4.0", "--seed", "0"]
  for name in ("a.png", "b.png"):
    result = _run(*args, "--out", tmp / name)
    assert result.returncode == 0, result.stderr
  assert (tmp / "a.png").read_bytes() == (tmp / "b.png").read_bytes()
  grid = np.asarray(Image.open(tmp / "a.png"))
  assert grid.shape == (2 * 10 + 2, 2 * 10 + 2, 3)  # 2x2 grid of 8x8 with 2-pixel padding
  assert _run(*args[:-1], "1", "--out", tmp / "c.png").returncode == 0
  assert (tmp / "c.png").read_bytes() != (tmp / "a.png").read_bytes()


def test_npz_matches_adm_format_and_is_reproducible(ckpt, tmp):
  args = ["--checkpoint", ckpt, "--num-samples", "5", "--batch-size", "2", "--method", "ddpm", "--steps", "4",
          "--cfg-scale", "1.5", "--cfg-mode", "dit"]
  for name in ("a.npz", "b.npz"):
    result = _run(*args, "--out", tmp / name)
    assert result.returncode == 0, result.stderr
  assert (tmp / "a.npz").read_bytes() == (tmp / "b.npz").read_bytes()
  data = np.load(tmp / "a.npz")
  assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (5, 8, 8, 4)
  assert data["labels"].shape == (5,) and data["labels"].max() < 10
  assert not (tmp / "a.npz.shards").exists()


def test_interrupted_npz_run_resumes(ckpt, tmp, caplog):
  model = dit_jax.load(ckpt)
  kw = dict(method="ddim", steps=3, cfg_scale=2.0, progress=False)
  full = sample_files.sample_to_npz(model, tmp / "full.npz", 7, 3, seed=5, **kw)
  # an interrupted run: only the first batch's shard made it to disk, plus a stray temporary file
  sample_files.sample_to_npz(model, tmp / "part.npz", 3, 3, seed=5, keep_shards=True, **kw)
  shards = tmp / "resumed.npz.shards"
  (tmp / "part.npz.shards").rename(shards)
  (shards / ".000001.npz.tmp-123.npz").write_bytes(b"partial")
  with caplog.at_level("INFO", logger="dit_jax"):
    sample_files.sample_to_npz(model, tmp / "resumed.npz", 7, 3, seed=5, **kw)
  assert "resuming: 1 of 3 batches" in caplog.text
  a, b = np.load(full), np.load(tmp / "resumed.npz")
  np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
  np.testing.assert_array_equal(a["labels"], b["labels"])


def test_quantisation_matches_sample_ddp():
  x = np.array([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0], np.float32)
  np.testing.assert_array_equal(sample_files.to_uint8(x), [0, 0, 64, 128, 255, 255, 255])


@pytest.mark.parametrize("extra,fragment", [
    (["--class-labels", "1,10,11"], "class id 11 is out of range 0..9"),
    (["--class-labels", "1,x"], "comma-separated integers"),
    (["--class-labels", "1", "--method", "plms"], "unknown method 'plms'"),
    (["--class-labels", "1", "--steps", "0"], "steps must be a positive integer"),
    (["--class-labels", "1", "--respacing", "ddim600"], "cannot take exactly 600"),
    (["--class-labels", "1", "--steps", "5000"], "exceeds the 1000 training timesteps"),
    (["--class-labels", "1", "--cfg-mode", "some"], "argument --cfg-mode: invalid choice: 'some'"),
    (["--class-labels", "1", "--method", "euler", "--shift", "-1"], "--shift must be a positive number, got -1"),
])
def test_bad_input_gets_one_line_error(ckpt, tmp, extra, fragment):
  result = _run("--checkpoint", ckpt, "--out", tmp / "x.png", *extra)
  one_line_error(result.returncode, result.stderr, fragment)
  assert not (tmp / "x.png").exists()


def test_missing_checkpoint_is_one_line(tmp):
  result = _run("--checkpoint", tmp / "nope", "--class-labels", "1", "--out", tmp / "x.png")
  one_line_error(result.returncode, result.stderr)


@pytest.mark.parametrize("extra,fragment", [
    (["--out", "{tmp}/a.jpg"], "--out must end in .png or .npz, got a.jpg"),
    (["--guidance-interval", "0.5"], "--guidance-interval takes two numbers lo,hi in [0, 1], got '0.5'"),
    (["--guidance-interval", "0.6,0.2"], "needs 0 <= lo < hi <= 1, got '0.6,0.2'"),
    (["--guidance-interval", "0,1.5"], "needs 0 <= lo < hi <= 1"),
    (["--guidance-interval", "a,b"], "takes two numbers"),
    (["--out", "{tmp}/x.npz", "--num-samples", "0"], "--num-samples must be a positive integer, got 0"),
    (["--out", "{tmp}/x.npz", "--num-samples", "4", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--shift", "-1"], "--shift must be a positive number, got -1"),
    (["--shift", "0"], "--shift must be a positive number, got 0"),
    (["--shift", "nan"], "--shift must be a positive number, got nan"),
    (["--steps", "-2"], "--steps must be a positive integer, got -2"),
    (["--zoom", "0"], "--zoom must be a positive integer, got 0"),
    (["--nrow", "0"], "--nrow must be a positive integer, got 0"),
    (["--eta", "-0.5"], "--eta must be a number >= 0, got -0.5"),
    (["--cfg-scale", "-1"], "--cfg-scale must be a number >= 0, got -1"),
    (["--slg-scale", "-2"], "--slg-scale must be a number >= 0"),
    (["--slg-start", "1.5"], "--slg-start must be a fraction of the steps in [0, 1], got 1.5"),
    (["--cfg-mode", "some"], "argument --cfg-mode: invalid choice: 'some' (choose from 'all', 'dit')"),
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["--flow-convention", "edm"], "argument --flow-convention: invalid choice: 'edm'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--preset", "flux_schnell"], "--preset flux_schnell is for MMDiT / FLUX models"),
    (["--preset", "digits_students:fast"], "unknown preset flavour 'fast'"),
])
def test_bad_flags_get_one_line_errors_and_keep_existing_outputs(ckpt, tmp, capsys, extra, fragment):
  """Argument and value errors (in process; the real process is covered above): one line, status 2, and an
  output file from an earlier run left as it was."""
  for name in ("x.png", "x.npz", "a.jpg"):
    (tmp / name).write_bytes(b"earlier output")
  extra = [a.format(tmp=tmp) for a in extra]
  out = [] if "--out" in extra else ["--out", tmp / "x.png"]
  code, err = _sample_main(["--checkpoint", ckpt, "--class-labels", "1", "--method", "euler", *out, *extra], capsys)
  one_line_error(code, err, fragment)
  assert all((tmp / name).read_bytes() == b"earlier output" for name in ("x.png", "x.npz", "a.jpg"))
  assert not (tmp / "x.npz.shards").exists()


def test_missing_required_flags_and_help(tmp, capsys):
  code, err = _sample_main(["--out", tmp / "x.png"], capsys)
  one_line_error(code, err, "the following arguments are required: --checkpoint")
  code, _ = _sample_main(["--help"], capsys)
  assert code == 0


def test_library_rejects_a_non_positive_shift(ckpt):
  import jax

  model = dit_jax.load(ckpt)
  for shift in (-1.0, 0.0, float("nan")):
    with pytest.raises(ValueError, match="shift must be > 0"):
      dit_jax.sample(model, np.array([1]), jax.random.key(0), method="euler", steps=2, shift=shift)


# ---------------------------------------------------------------------------------------------------------------
# MMDiT checkpoints: --cond text embeddings, presets, bundled 16-channel VAE with shift_factor

MMDIT = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
             joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=6, out_channels=16,
             pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0,))


def _sample_main(argv, capsys) -> tuple[int, str]:
  return main_in_process("sample.py", argv, capsys)


@pytest.fixture(scope="module")
def mmdit_ckpt(tmp_path_factory):
  import jax
  from flax import nnx

  from dit_jax.models.mmdit import MMDiT, MMDiTConfig
  from dit_jax.models.vae import AutoencoderKL, VAEConfig

  tmp = tmp_path_factory.mktemp("mmdit")
  rng = np.random.default_rng(1)

  def random(make):  # abstract init (fast), then random weights of a moderate scale
    graphdef, state = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, jax.tree.map(lambda a: 0.2 * rng.standard_normal(a.shape).astype(np.float32), state))

  model = random(lambda: MMDiT(MMDiTConfig(**MMDIT), rngs=nnx.Rngs(0)))
  vae = random(lambda: AutoencoderKL(VAEConfig(latent_channels=16, block_out_channels=(32, 32), layers_per_block=1,
                                               scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                                               use_post_quant_conv=False), rngs=nnx.Rngs(0)))
  dit_jax.save(model, tmp / "ckpt", vae=vae)
  rng = np.random.default_rng(0)
  cond = dict(context=rng.standard_normal((3, 4, 12)), pooled=rng.standard_normal((3, 6)),
              negative_context=rng.standard_normal((1, 4, 12)), negative_pooled=rng.standard_normal((1, 6)))
  np.savez(tmp / "cond.npz", **cond)
  return tmp, cond


def test_mmdit_cond_npz_with_preset_decodes_through_bundled_vae(mmdit_ckpt, tmp, capsys):
  import jax

  base, cond = mmdit_ckpt
  args = ["--checkpoint", base / "ckpt", "--cond", base / "cond.npz", "--preset", "sd35_medium:diffusers",
          "--steps", "3", "--slg-layers", "1", "--latent-size", "8,6", "--seed", "4"]
  code, err = _sample_main([*args, "--out", tmp / "s.npz"], capsys)
  assert code == 0, err
  data = np.load(tmp / "s.npz")
  images, latents = data["arr_0"], data["latents"]
  assert images.dtype == np.uint8 and images.shape == (3, 16, 12, 3) and latents.shape == (3, 8, 6, 16)
  assert len(np.unique(images)) > 50 and np.isfinite(latents).all()
  # explicit --steps / --slg-layers override the preset; the rest (euler, shift 3, cfg 7, SLG 2.8) comes from it
  model, vae = dit_jax.load(base / "ckpt"), dit_jax.load_vae(base / "ckpt")
  negative = dict(context=cond["negative_context"], pooled=cond["negative_pooled"])
  expected = dit_jax.sample(model, dict(context=cond["context"], pooled=cond["pooled"]),
                            jax.random.fold_in(jax.random.key(4), 0), method="euler", steps=3, shift=3.0,
                            cfg_scale=7.0, negative=negative, latent_size=(8, 6),
                            skip_layer_guidance=dict(layers=[1], scale=2.8, start=0.01, stop=0.2))
  np.testing.assert_allclose(latents, expected, rtol=0, atol=1e-6)
  decoded = vae.decode(np.asarray(expected) / 1.5305 + 0.0609)  # SD3 units -> raw latents: z / scale + shift
  assert np.abs(images.astype(int) - sample_files.to_uint8(np.clip(decoded, -1, 1)).astype(int)).max() <= 1
  code, err = _sample_main([*args, "--out", tmp / "g.png"], capsys)
  assert code == 0, err
  assert np.asarray(Image.open(tmp / "g.png")).shape == (2 * (16 + 2) + 2, 2 * (12 + 2) + 2, 3)


def _write_cond(path, **arrays):
  np.savez(path, **arrays)
  return path


@pytest.mark.parametrize("case,fragment", [
    ("no_file", "--cond file"),
    ("no_pooled", "missing pooled"),
    ("rank", "cond context has shape (3, 12)"),
    ("dim", "cond pooled has shape (3, 5)"),
    ("batch", "context has 3 rows, pooled 2"),
    ("negative_rows", "negative context has 2 rows; expected 1 or the batch size 3"),
    ("half_negative", "negative_context without its partner"),
    ("latent_size", "latent_size 8x18 exceeds pos_embed_max_size * patch_size = 16"),
    ("labels", "give exactly one"),
    ("labels_only", "was not trained on class tokens"),
    ("no_cond", "an MMDiT checkpoint needs --prompt TEXT / --prompts FILE, --cond"),
    ("preset", "unknown sampling preset 'sd4'"),
    ("slg_layer", "skip_layer_guidance layers [5] outside the model's blocks 0..1"),
    ("slg_window", "skip-layer guidance needs --slg-start < --slg-stop, got 0.5 and 0.2"),
])
def test_mmdit_bad_input_gets_one_line_error(mmdit_ckpt, tmp, capsys, case, fragment):
  base, cond = mmdit_ckpt
  ctx, pooled = cond["context"], cond["pooled"]
  files = {
      "no_pooled": dict(context=ctx), "rank": dict(context=ctx[:, 0], pooled=pooled),
      "dim": dict(context=ctx, pooled=pooled[:, :5]), "batch": dict(context=ctx, pooled=pooled[:2]),
      "negative_rows": dict(context=ctx, pooled=pooled, negative_context=ctx[:2], negative_pooled=pooled[:1]),
      "half_negative": dict(context=ctx, pooled=pooled, negative_context=ctx[:1]),
  }
  cond_file = _write_cond(tmp / "c.npz", **files[case]) if case in files else base / "cond.npz"
  cond_args = {"no_file": ["--cond", tmp / "none.npz"], "no_cond": [], "labels_only": []}.get(case, ["--cond", cond_file])
  extra = {"latent_size": ["--latent-size", "8,18"], "labels": ["--class-labels", "1"], "labels_only": ["--class-labels", "1"], "preset": ["--preset", "sd4"],
           "slg_layer": ["--slg-layers", "5", "--slg-scale", "2"],
           "slg_window": ["--slg-layers", "1", "--slg-scale", "2", "--slg-start", "0.5"]}.get(case, [])
  argv = ["--checkpoint", base / "ckpt", "--out", tmp / "x.png", "--steps", "2", *cond_args, *extra]
  code, err = _sample_main(argv, capsys)
  one_line_error(code, err, fragment)
  assert not (tmp / "x.png").exists()


def test_cond_given_to_a_dit_is_one_line(ckpt, mmdit_ckpt, tmp, capsys):
  code, err = _sample_main(["--checkpoint", ckpt, "--cond", mmdit_ckpt[0] / "cond.npz", "--out", tmp / "x.png"],
                           capsys)
  one_line_error(code, err, "--cond is for MMDiT checkpoints")
