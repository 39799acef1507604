"""VP diffusion: respacing, loss pieces against closed forms, samplers against diffusers' schedulers and DiTPipeline.

The network in every sampler test is a random diffusers DiT converted with dit_jax's converter, so the torch side
is entirely upstream code: the transformer, the scheduler and (end to end) the pipeline.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch

import dit_jax
from dit_jax.convert.files import convert
from dit_jax.diffusion import vp
from dit_jax.diffusion.samplers import sample
from tests.helpers import rel_err
from tests.helpers.reference import diffusers_dit

SAMPLER_TOL = 1e-4


# -- respacing ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,head,tail", [
    ("250", [0, 4, 8, 12, 16, 20], [987, 991, 995, 999]),
    ("100", [0, 10, 20], [969, 979, 989, 999]),
    ("50", [0, 20, 41, 61, 82, 102], [938, 958, 979, 999]),
    ("25", [0, 42, 83, 125, 166, 208], [874, 916, 957, 999]),
    ("ddim50", [0, 20, 40], [960, 980]),
    ("ddim25", [0, 40, 80], [920, 960]),
    ("ddim250", [0, 4, 8], [992, 996]),
    ("10,20", [0, 55, 111], [946, 973, 999]),
])
def test_space_timesteps_worked_examples(spec, head, tail):
  """Values from the original respace.py worked examples (dit-reference.md §2.6)."""
  steps = vp.space_timesteps(1000, spec)
  assert steps[:len(head)] == head and steps[-len(tail):] == tail
  if not spec.startswith("ddim") and "," not in spec:
    assert len(steps) == int(spec)


@pytest.mark.parametrize("spec", ["ddim600", "1001", "abc", "0", "ddim-3"])
def test_impossible_respacing_is_an_error(spec):
  with pytest.raises(ValueError, match="respacing"):
    vp.space_timesteps(1000, spec)


def test_respaced_betas_and_tables():
  d = vp.create_diffusion("250")
  np.testing.assert_allclose([d.betas[0], d.betas[1], d.betas[-1]], [1.0e-4, 5.9907e-4, 7.7519e-2], rtol=1e-4)
  assert d.timestep_map[-1] == 999 and d.num_timesteps == 250
  full = vp.create_diffusion("")
  assert full.num_timesteps == 1000 and abs(full.alphas_cumprod[-1] - 4.0358e-5) < 1e-8
  # the learned-range upper bound log(beta) uses the respaced betas
  assert np.allclose(d.log_betas, np.log(d.betas))
  cos = vp.create_diffusion("", schedule="cosine")
  assert cos.betas.max() <= 0.999 and cos.betas[0] < 1e-4


def test_respaced_process_matches_diffusers_alphas():
  """Respacing keeps alpha-bar of the kept steps: compare with diffusers' DDIMScheduler tables."""
  from diffusers import DDIMScheduler

  sched = DDIMScheduler(beta_schedule="linear")
  d = vp.create_diffusion("ddim50")
  ref = sched.alphas_cumprod.numpy()[d.timestep_map]
  np.testing.assert_allclose(d.alphas_cumprod, ref, rtol=2e-6)


# -- loss pieces against closed forms -----------------------------------------------------------------------------

def test_normal_kl_matches_integral():
  for m1, lv1, m2, lv2 in [(0.0, 0.0, 0.0, 0.0), (0.3, -1.0, -0.2, 0.5), (1.0, 0.7, 0.9, -0.4)]:
    p, q = scipy.stats.norm(m1, np.exp(lv1 / 2)), scipy.stats.norm(m2, np.exp(lv2 / 2))
    ref = scipy.integrate.quad(lambda x, p=p, q=q: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), -30, 30)[0]
    ours = float(vp.normal_kl(jnp.float32(m1), jnp.float32(lv1), jnp.float32(m2), jnp.float32(lv2)))
    assert abs(ours - ref) < 1e-5, (ours, ref)


def test_discretized_log_likelihood_matches_scipy():
  """Bins of width 2/255 on [-1, 1] with open-ended edge bins; the CDF is IDDPM's tanh approximation (|err| < 2e-4)."""
  rng = np.random.default_rng(0)
  x = np.concatenate([np.round((rng.uniform(-1, 1, 200) + 1) * 127.5) / 127.5 - 1, [-1.0, 1.0]]).astype(np.float32)
  means = rng.normal(0, 0.5, x.shape).astype(np.float32)
  log_scales = rng.uniform(-3, 0, x.shape).astype(np.float32)
  dist = scipy.stats.norm(means, np.exp(log_scales))
  upper = np.where(x > 0.999, 1.0, dist.cdf(x + 1 / 255))
  lower = np.where(x < -0.999, 0.0, dist.cdf(x - 1 / 255))
  ref_prob = upper - lower
  ours = np.exp(np.asarray(vp.discretized_gaussian_log_likelihood(jnp.asarray(x), jnp.asarray(means),
                                                                  jnp.asarray(log_scales))))
  assert np.abs(ours - np.maximum(ref_prob, 1e-12)).max() < 5e-4
  cdf = np.asarray(vp.approx_standard_normal_cdf(jnp.linspace(-6, 6, 1001)))
  assert np.abs(cdf - scipy.stats.norm.cdf(np.linspace(-6, 6, 1001))).max() < 2e-4


def test_hybrid_loss_structure_and_gradients():
  """loss = mse + vb; vb is KL in bits for t > 0 and the decoder NLL at t = 0; the VLB trains only the variance."""
  d = vp.create_diffusion("")
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.uniform(-1, 1, (4, 4, 4, 2)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
  t = jnp.array([0, 1, 500, 999])
  out = jnp.asarray(rng.normal(0, 0.5, (4, 4, 4, 4)), jnp.float32)
  terms = d.training_losses(lambda x, tt: out, x0, t, noise)
  np.testing.assert_allclose(terms["loss"], terms["mse"] + terms["vb"], rtol=1e-6)
  np.testing.assert_allclose(terms["mse"], ((noise - out[..., :2]) ** 2).mean((1, 2, 3)), rtol=1e-6)
  # KL term by hand from the closed-form posterior (t = 500)
  x_t = d.q_sample(x0, t, noise)
  true_mean, true_lv = d.q_posterior(x0, x_t, t)
  mean, lv, _ = d.p_mean_variance(out, x_t, t)
  kl = 0.5 * (-1 + lv - true_lv + jnp.exp(true_lv - lv) + (true_mean - mean) ** 2 * jnp.exp(-lv))
  np.testing.assert_allclose(terms["vb"][2], kl[2].mean() / np.log(2), rtol=1e-5)
  # gradient routing
  g_vb = jax.grad(lambda o: d.training_losses(lambda x, tt: o, x0, t, noise)["vb"].sum())(out)
  g_mse = jax.grad(lambda o: d.training_losses(lambda x, tt: o, x0, t, noise)["mse"].sum())(out)
  assert not jnp.any(g_vb[..., :2]) and jnp.all(jnp.any(g_vb[..., 2:] != 0, axis=(1, 2, 3)))
  assert not jnp.any(g_mse[..., 2:])


# -- samplers against diffusers -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(torch DiT, our DiT) with the same random weights, 1000 classes so DiTPipeline's null id 1000 applies."""
  tmp = tmp_path_factory.mktemp("dit")
  ref = diffusers_dit(depth=2, sample_size=8, num_classes=1000, heads=2, head_dim=32)
  ref.save_pretrained(tmp / "dit")
  convert(tmp / "dit", tmp / "ckpt")
  return ref, dit_jax.load(tmp / "ckpt")


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def _guided_torch(ref, x, t, y, scale):
  """The reference guidance on a 2C output: eps guided on all channels, variance from the conditional half."""
  if scale == 1.0:
    return ref(x, t.expand(len(x)), y).sample
  out = ref(torch.cat([x, x]), t.expand(2 * len(x)), torch.cat([y, torch.full_like(y, 1000)])).sample
  cond, uncond = out.chunk(2)
  c = x.shape[1]
  return torch.cat([uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c]), cond[:, c:]], dim=1)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_ddpm_learned_range_matches_ddpm_scheduler(converted, monkeypatch, scale):
  from diffusers import DDPMScheduler
  from diffusers.schedulers import scheduling_ddpm

  ref, ours = converted
  steps, b = 20, 3
  rng = np.random.default_rng(1)
  x_T = rng.standard_normal((b, 8, 8, 4)).astype(np.float32)
  step_noise = rng.standard_normal((steps, b, 8, 8, 4)).astype(np.float32)
  y = np.array([3, 999, 1000])
  queue = iter(_nchw(z) for z in step_noise)
  monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: next(queue))
  sched = DDPMScheduler(variance_type="learned_range", clip_sample=False)
  sched.set_timesteps(steps)
  x, yt = _nchw(x_T), torch.from_numpy(y)
  with torch.no_grad():
    for t in sched.timesteps:
      x = sched.step(_guided_torch(ref, x, t, yt, scale), t, x).prev_sample
  latents = sample(ours, y, method="ddpm", respacing=f"ddim{steps}", cfg_scale=scale, noise=x_T,
                   step_noise=step_noise)
  err = rel_err(latents, x.numpy().transpose(0, 2, 3, 1))
  assert err <= SAMPLER_TOL, f"DDPM learned-range vs DDPMScheduler: rel err {err:.2e}"


def test_ddim_eta_matches_ddim_scheduler(converted):
  from diffusers import DDIMScheduler

  ref, ours = converted
  steps, b = 25, 2
  rng = np.random.default_rng(2)
  x_T = rng.standard_normal((b, 8, 8, 4)).astype(np.float32)
  step_noise = rng.standard_normal((steps, b, 8, 8, 4)).astype(np.float32)
  y = np.array([7, 11])
  for eta in (0.0, 0.7):
    sched = DDIMScheduler(beta_schedule="linear", clip_sample=False)
    sched.set_timesteps(steps)
    x = _nchw(x_T)
    with torch.no_grad():
      for k, t in enumerate(sched.timesteps):
        eps = _guided_torch(ref, x, t, torch.from_numpy(y), 1.5)[:, :4]
        x = sched.step(eps, t, x, eta=eta, variance_noise=_nchw(step_noise[k])).prev_sample
    latents = sample(ours, y, method="ddim", respacing=f"ddim{steps}", cfg_scale=1.5, eta=eta, noise=x_T,
                     step_noise=step_noise if eta else None)
    err = rel_err(latents, x.numpy().transpose(0, 2, 3, 1))
    assert err <= SAMPLER_TOL, f"DDIM eta={eta} vs DDIMScheduler: rel err {err:.2e}"


def test_dit_pipeline_end_to_end(converted, monkeypatch):
  """diffusers DiTPipeline (DDIM 50, CFG 4 on all latent channels) from the same initial latent."""
  from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline
  from diffusers.pipelines.dit import pipeline_dit

  ref, ours = converted
  labels = [1, 207, 999]
  x_T = np.random.default_rng(3).standard_normal((3, 8, 8, 4)).astype(np.float32)
  monkeypatch.setattr(pipeline_dit, "randn_tensor", lambda *a, **k: _nchw(x_T))
  vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, layers_per_block=1)
  captured = {}

  def capture_decode(latents, *a, **k):
    captured["latents"] = latents * vae.config.scaling_factor
    return type("Out", (), {"sample": torch.zeros(latents.shape[0], 3, 8, 8)})()

  monkeypatch.setattr(vae, "decode", capture_decode)
  pipe = DiTPipeline(transformer=ref, vae=vae, scheduler=DDIMScheduler(beta_schedule="linear", clip_sample=False))
  pipe.set_progress_bar_config(disable=True)
  pipe(class_labels=labels, guidance_scale=4.0, num_inference_steps=50, output_type="np")
  latents = sample(ours, np.array(labels), method="ddim", respacing="ddim50", cfg_scale=4.0, noise=x_T)
  err = rel_err(latents, captured["latents"].numpy().transpose(0, 2, 3, 1))
  assert err <= SAMPLER_TOL, f"DiTPipeline DDIM-50 CFG 4: rel err {err:.2e}"


def test_dit_cfg_mode_guides_three_channels(converted):
  _, ours = converted
  y = np.array([5, 6])
  x_T = np.random.default_rng(4).standard_normal((2, 8, 8, 4)).astype(np.float32)
  kw = dict(method="ddim", steps=5, noise=x_T, cfg_scale=4.0)
  dit_mode, all_mode = sample(ours, y, cfg_mode="dit", **kw), sample(ours, y, cfg_mode="all", **kw)
  assert rel_err(dit_mode, all_mode) > 1e-3
  from dit_jax.diffusion.guidance import combine
  cond, uncond = jnp.ones((1, 2, 2, 8)), jnp.zeros((1, 2, 2, 8))
  out = combine(cond, uncond, 4.0, 3)
  np.testing.assert_array_equal(out[..., :3], 4.0)
  np.testing.assert_array_equal(out[..., 3:], 1.0)


def test_sampling_is_deterministic_and_validates_input(converted):
  _, ours = converted
  key = jax.random.key(0)
  a = sample(ours, np.array([1, 2]), key, method="ddpm", steps=10)
  b = sample(ours, np.array([1, 2]), key, method="ddpm", steps=10)
  np.testing.assert_array_equal(a, b)
  bad = [
      (dict(cond=np.array([1001])), "class id 1001 is out of range"),
      (dict(cond=np.array([-1])), "class id -1"),
      (dict(method="plms"), "unknown sampling method"),
      (dict(steps=0), "steps must be a positive integer"),
      (dict(steps=2000), "exceeds the 1000 training timesteps"),
      (dict(respacing="ddim600"), "cannot take exactly 600"),
      (dict(noise=np.zeros((2, 4, 8, 8))), "noise has shape"),
      (dict(cfg_mode="some"), "unknown cfg mode"),
      (dict(key=None), "needs a PRNG key"),
  ]
  for overrides, fragment in bad:
    kw = dict(cond=np.array([1, 2]), key=key, method="ddpm", steps=10) | overrides
    with pytest.raises(ValueError, match=fragment):
      sample(ours, kw.pop("cond"), kw.pop("key"), **kw)


def test_guidance_interval(converted):
  """Guidance inside [lo, hi] only: an interval covering every step equals full CFG, one covering none equals no
  CFG, and a partial one differs from both."""
  _, ours = converted
  y = np.array([5, 6])
  x_T = np.random.default_rng(5).standard_normal((2, 8, 8, 4)).astype(np.float32)
  kw = dict(method="ddim", steps=6, noise=x_T)
  full, none = sample(ours, y, cfg_scale=3.0, **kw), sample(ours, y, cfg_scale=1.0, **kw)
  np.testing.assert_array_equal(sample(ours, y, cfg_scale=3.0, guidance_interval=(0.0, 1.0), **kw), full)
  np.testing.assert_array_equal(sample(ours, y, cfg_scale=3.0, guidance_interval=(2.0, 3.0), **kw), none)
  part = sample(ours, y, cfg_scale=3.0, guidance_interval=(0.0, 0.5), **kw)
  assert rel_err(part, full) > 1e-4 and rel_err(part, none) > 1e-4


def test_cdf_tails_match_torch_float32():
  """The t = 0 decoder NLL takes log(1 - cdf) in float32; its tails must follow the original's torch.tanh (XLA's
  CPU tanh alone is off by up to 11 nats there, which moved the hybrid loss at t = 0 by 3%)."""
  x = np.linspace(-8.5, 8.5, 50001).astype(np.float32)
  xt = torch.from_numpy(x)
  ref = (0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (xt + 0.044715 * torch.pow(xt, 3))))).numpy()
  ours = np.asarray(vp.approx_standard_normal_cdf(jnp.asarray(x)))
  log_tail = lambda c: np.log(np.maximum(1.0 - c, 1e-12))
  for err in (np.abs(log_tail(ours) - log_tail(ref)),
              np.abs(np.log(np.maximum(ours, 1e-12)) - np.log(np.maximum(ref, 1e-12)))):
    # one-ulp tanh differences deep in the tail still move a log by a few 1e-3 at isolated points
    assert err.max() < 1e-2 and (err > 1e-3).sum() <= 5, (err.max(), (err > 1e-3).sum())
