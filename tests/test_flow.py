"""Rectified flow: schedules against diffusers and Stability's values, samplers step for step against diffusers'
schedulers, and closed forms (Gaussian data, whose exact velocity and ODE map are known) for the rest."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats

from dit_jax.diffusion import flow
from tests.helpers import rel_err

SHAPE = (3, 4, 4, 4)  # B, H, W, C of the scheduler parity runs
DIM = 4 * 4 * 4


# ---------------------------------------------------------------------------------------------------------------
# Path, conventions, t-sampling, shifts


def test_path_and_conventions():
  rng = np.random.default_rng(0)
  x0, noise = rng.standard_normal((2, *SHAPE)).astype(np.float32)
  sigma = np.array([0.0, 0.3, 1.0], np.float32)
  xt = flow.interpolate(x0, noise, sigma)
  np.testing.assert_allclose(xt[0], x0[0])
  np.testing.assert_allclose(xt[2], noise[2])
  np.testing.assert_allclose(xt[1], 0.7 * x0[1] + 0.3 * noise[1], rtol=1e-6, atol=1e-6)
  v = flow.velocity_target(x0, noise)
  np.testing.assert_allclose(xt - sigma[:, None, None, None] * v, x0, atol=1e-6)  # SD3's denoised x - sigma v
  # SiT: t = 1 - sigma, x_t = t x1 + (1 - t) x0 with x1 data and x0 noise; target x1 - x0 (SiT's ICPlan.plan).
  t = flow.SIT.model_time(sigma)
  np.testing.assert_allclose(t, 1 - sigma)
  np.testing.assert_allclose(xt, t[:, None, None, None] * x0 + (1 - t[:, None, None, None]) * noise, atol=1e-6)
  np.testing.assert_array_equal(flow.SIT.to_sd3_velocity(x0 - noise), v)
  np.testing.assert_allclose(flow.SD3.model_time(sigma), 1000 * sigma)
  np.testing.assert_array_equal(flow.SD3.to_sd3_velocity(v), v)
  # FLUX: the SD3 path and velocity, fed sigma itself (the model multiplies by 1000 inside)
  np.testing.assert_array_equal(flow.FLUX.model_time(sigma), sigma)
  np.testing.assert_array_equal(flow.FLUX.to_sd3_velocity(v), v)
  assert flow.CONVENTIONS == {"sd3": flow.SD3, "sit": flow.SIT, "flux": flow.FLUX}


def test_sample_sigmas_distributions():
  key = jax.random.key(0)
  n = 20000
  s = np.asarray(flow.sample_sigmas(key, n, "logit_normal", loc=0.5, scale=0.8), np.float64)
  ks = stats.kstest(np.log(s / (1 - s)), stats.norm(0.5, 0.8).cdf)
  assert ks.pvalue > 1e-3, f"logit-normal: KS {ks.statistic:.4f} p {ks.pvalue:.2e}"
  u = np.asarray(flow.sample_sigmas(key, n, "uniform"), np.float64)
  assert stats.kstest(u, "uniform").pvalue > 1e-3
  # mode: f decreases from 1 to 0, so P(sigma <= f(u)) = 1 - u on a grid of u; a KS bound on the empirical CDF.
  s = np.sort(np.asarray(flow.sample_sigmas(jax.random.key(1), (n,), "mode", mode_scale=1.29), np.float64))
  grid = np.linspace(0.01, 0.99, 99)
  f = 1 - grid - 1.29 * (np.cos(np.pi * grid / 2) ** 2 - 1 + grid)
  gap = np.abs(np.searchsorted(s, f) / n - (1 - grid)).max()
  assert gap < 1.95 / np.sqrt(n), f"mode CDF gap {gap:.4f}"  # KS 0.1 % critical value
  assert np.mean(np.abs(s - 0.5) < 0.1) > 0.3  # s = 1.29 piles mass in the middle (uniform: 0.2)
  uniform = flow.sample_sigmas(key, 8, "uniform")
  np.testing.assert_allclose(flow.sample_sigmas(key, 8, "mode", mode_scale=0.0), 1 - uniform, atol=1e-6)
  for kind in ("logit_normal", "uniform", "mode"):
    s = np.asarray(flow.sample_sigmas(key, (4, 5000), kind, scale=3.0))
    assert s.shape == (4, 5000) and s.dtype == np.float32 and (s > 0).all() and (s < 1).all(), kind


def test_shifts():
  sigma = np.linspace(0.01, 0.99, 50)
  alpha = flow.resolution_shift(4096)  # 1024 px: 128 x 128 latent, 2 x 2 patches
  assert alpha == 4.0 and flow.resolution_shift(256) == 1.0
  # SD3 paper: t_m = alpha t_n / (1 + (alpha - 1) t_n), i.e. log-SNR log((1-t)/t)^2 moved by -2 log(alpha).
  shifted = flow.shift_sigmas(sigma, alpha)
  np.testing.assert_allclose(shifted, alpha * sigma / (1 + (alpha - 1) * sigma))
  log_snr = lambda s: np.log(((1 - s) / s) ** 2)
  np.testing.assert_allclose(log_snr(shifted), log_snr(sigma) - 2 * np.log(alpha), atol=1e-12)
  np.testing.assert_allclose(flow.time_shift_exponential(np.log(alpha), 1.0, sigma), shifted, rtol=1e-12)
  assert flow.dynamic_shift_mu(256) == pytest.approx(0.5) and flow.dynamic_shift_mu(4096) == pytest.approx(1.15)


# ---------------------------------------------------------------------------------------------------------------
# Schedules


@pytest.mark.parametrize("steps", [4, 28, 50])
def test_flow_sigmas_match_diffusers(steps):
  from diffusers import FlowMatchEulerDiscreteScheduler

  sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
  sched.set_timesteps(steps)
  ours = flow.flow_sigmas(steps, 3.0)
  assert ours.shape == (steps + 1,) and ours.dtype == np.float32 and ours[0] == 1 and ours[-1] == 0
  err = np.abs(ours - sched.sigmas.numpy()).max()
  assert err <= 1e-6, f"max abs err {err:.2e}"


def test_flow_sigmas_match_stability_values():
  # Stability's ModelSamplingDiscreteFlow(shift=3).get_sigmas, as tabulated in the reference notes.
  np.testing.assert_allclose(flow.flow_sigmas(4, 3.0), [1.0, 0.857692, 0.602151, 0.008929, 0], atol=5e-7)
  s28 = flow.flow_sigmas(28, 3.0)
  np.testing.assert_allclose(s28[[0, 1, 2, 3, -3, -2, -1]], [1.0, 0.987381, 0.974108, 0.960129, 0.110906, 0.008929, 0],
                             atol=5e-7)


def test_dynamic_and_dpm_sigmas_match_diffusers():
  from diffusers import FlowMatchEulerDiscreteScheduler

  sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
  sched.set_timesteps(20, mu=0.9)
  err = np.abs(flow.flow_sigmas(20, mu=0.9) - sched.sigmas.numpy()).max()
  assert err <= 1e-6, f"dynamic shift: max abs err {err:.2e}"
  for steps in (4, 50):
    dpm = _dpm_scheduler()
    dpm.set_timesteps(steps)
    err = np.abs(flow.dpm_flow_sigmas(steps, 3.0) - dpm.sigmas.numpy()).max()
    assert err <= 1e-6, f"DPM flow sigmas ({steps}): max abs err {err:.2e}"


# ---------------------------------------------------------------------------------------------------------------
# Samplers against diffusers' schedulers, with the same stand-in velocity in torch and jax


def _stand_in():
  """v = tanh(W x) (1 + sigma) on the flattened latent: a fixed nonlinear test model in both frameworks."""
  w = (np.random.default_rng(1).standard_normal((DIM, DIM)) * 1.5 / np.sqrt(DIM)).astype(np.float32)
  wt = torch.from_numpy(w)

  def torch_fn(x, sigma):
    return (torch.tanh(x.reshape(x.shape[0], -1) @ wt) * (1 + sigma)).reshape(x.shape)

  def jax_fn(x, sigma):
    return (jnp.tanh(x.reshape(x.shape[0], -1) @ w) * (1 + sigma[:, None])).reshape(x.shape)

  return torch_fn, jax_fn


def _dpm_scheduler():
  from diffusers import DPMSolverMultistepScheduler

  return DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0,
                                     algorithm_type="dpmsolver++", solver_order=2)


def _run_scheduler(sched, torch_fn, x):
  """diffusers' denoising loop; the model sees the scheduler's sigma for each entry of ``timesteps``."""
  sched.set_begin_index(0)
  x = torch.from_numpy(x)
  with torch.no_grad():
    for k, t in enumerate(sched.timesteps):
      x = sched.step(torch_fn(x, sched.sigmas[k]), t, x).prev_sample
  return x.numpy()


@pytest.mark.parametrize("method,schedule", [("euler", "flow"), ("heun", "flow"), ("dpmpp_2m", "dpm"),
                                             ("dpmpp_2m", "flow")])
def test_sampler_matches_diffusers(method, schedule):
  """schedule 'flow': flow_sigmas (from sigma = 1, where the DPM log-SNR is -inf; forced into the DPM scheduler);
  'dpm': the DPM scheduler's own sigmas."""
  from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

  steps = 12
  torch_fn, jax_fn = _stand_in()
  x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
  sigmas = flow.dpm_flow_sigmas(steps, 3.0) if schedule == "dpm" else flow.flow_sigmas(steps, 3.0)
  if method == "dpmpp_2m":
    sched = _dpm_scheduler()
  else:
    sched = (FlowMatchEulerDiscreteScheduler if method == "euler" else FlowMatchHeunDiscreteScheduler)(shift=3.0)
  sched.set_timesteps(steps)
  if method == "dpmpp_2m" and schedule == "flow":
    sched.sigmas = torch.from_numpy(sigmas)
  ref = _run_scheduler(sched, torch_fn, x)
  ours = jax.jit(getattr(flow, method), static_argnums=0)(jax_fn, jnp.asarray(x), jnp.asarray(sigmas))
  err = rel_err(ours, ref)
  assert err < 1e-5, f"{method} on {schedule} sigmas: rel err {err:.2e}"
  assert np.abs(ref - x).max() > 0.5  # the trajectory moved


def test_dpmpp_2m_sd35_matches_k_diffusion():
  sampling = pytest.importorskip("k_diffusion.sampling")
  torch_fn, jax_fn = _stand_in()
  x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
  sigmas = flow.flow_sigmas(12, 3.0)
  denoiser = lambda x, sigma: x - torch_fn(x, sigma[0]) * sigma[0]  # Stability's calculate_denoised
  with torch.no_grad():
    ref = sampling.sample_dpmpp_2m(denoiser, torch.from_numpy(x), torch.from_numpy(sigmas), disable=True).numpy()
  err = rel_err(flow.dpmpp_2m_sd35(jax_fn, jnp.asarray(x), sigmas), ref)
  assert err < 1e-5, f"rel err {err:.2e}"


# ---------------------------------------------------------------------------------------------------------------
# Closed forms: data x0 ~ N(mu, s^2) per channel


MU = np.array([0.5, -1.0], np.float32)
STD = np.array([0.6, 1.5], np.float32)


def gaussian_velocity(x, sigma):
  """E[noise - x0 | x_sigma] for x0 ~ N(MU, STD^2): x_sigma is Gaussian with mean a MU and variance
  V = a^2 STD^2 + sigma^2 (a = 1 - sigma), Cov(noise, x) = sigma, Cov(x0, x) = a STD^2, so
  v = (sigma - a STD^2)(x - a MU) / V - MU."""
  s = sigma[:, None, None, None]
  a = 1 - s
  var = a ** 2 * STD ** 2 + s ** 2
  return (s - a * STD ** 2) * (x - a * MU) / var - MU


def _on_path(sigma, z):
  """The exact probability-flow ODE of the Gaussian keeps x_sigma = a MU + sqrt(V) z along each trajectory."""
  return (1 - sigma) * MU + np.sqrt((1 - sigma) ** 2 * STD ** 2 + sigma ** 2) * z


def _ode_error(method, steps, start=0.95, end=0.05):
  """Max error of a sampler's map from sigma ``start`` to ``end`` on a uniform grid (inside (0, 1), where both
  DPM-Solver step measures log sigma and log((1 - sigma) / sigma) stay bounded)."""
  z = jnp.linspace(-3, 3, 64 * 2, dtype=jnp.float32).reshape(64, 1, 1, 2)
  out = getattr(flow, method)(gaussian_velocity, _on_path(start, z), np.linspace(start, end, steps + 1))
  return float(jnp.abs(out - _on_path(end, z)).max())


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2), ("dpmpp_2m_sd35", 2)])
def test_ode_samplers_converge_to_exact_map(method, order):
  errs = [_ode_error(method, n) for n in (20, 40, 80)]
  rates = [np.log2(errs[i] / errs[i + 1]) for i in range(2)]
  assert errs[-1] < (0.1 if order == 1 else 3e-3), f"{method}: errors {errs}"
  assert min(rates) > order - 0.2, f"{method}: errors {errs}, observed orders {rates}"


def test_dpmpp_2m_variants_differ_only_in_the_correction():
  sigmas = flow.flow_sigmas(10, 3.0)
  z = jax.random.normal(jax.random.key(0), (16, 1, 1, 2))
  a, b = (f(gaussian_velocity, z, sigmas) for f in (flow.dpmpp_2m, flow.dpmpp_2m_sd35))
  assert rel_err(a, b) > 1e-4, rel_err(a, b)  # different algorithms on the same sigmas
  two = sigmas[[0, 1, -1]]  # no step has a second-order correction: both reduce to Euler
  np.testing.assert_allclose(flow.dpmpp_2m(gaussian_velocity, z, two), flow.euler(gaussian_velocity, z, two),
                             atol=1e-6)
  np.testing.assert_allclose(flow.dpmpp_2m_sd35(gaussian_velocity, z, two), flow.euler(gaussian_velocity, z, two),
                             atol=1e-6)


def _moments(x):
  x = np.asarray(x, np.float64).reshape(-1, 2)
  return x.mean(0), x.std(0)


def test_euler_and_sde_sample_the_gaussian():
  n = 20000
  noise = jax.random.normal(jax.random.key(0), (n, 1, 1, 2))
  tol_mean, tol_std = 5 * STD / np.sqrt(n), 5 * STD / np.sqrt(2 * n)
  ode = jax.jit(flow.euler, static_argnums=0)(gaussian_velocity, noise, flow.flow_sigmas(400, 1.0))
  sigmas = flow.sit_sde_sigmas(250, 0.04)
  sde = jax.jit(lambda x, k: flow.euler_maruyama(gaussian_velocity, x, sigmas, key=k))(noise, jax.random.key(1))
  for name, out in (("euler", ode), ("euler_maruyama", sde)):
    mean, std = _moments(out)
    assert (np.abs(mean - MU) < tol_mean).all(), f"{name}: mean {mean} vs {MU} (tol {tol_mean})"
    assert (np.abs(std - STD) < tol_std).all(), f"{name}: std {std} vs {STD} (tol {tol_std})"
  assert float(jnp.abs(sde - ode).max()) > 0.1  # the SDE is not the ODE


def test_euler_maruyama_replays_noise_and_jits():
  sigmas = flow.sit_sde_sigmas(20, 0.04)
  x = jax.random.normal(jax.random.key(0), (4, 2, 2, 2))
  noise = jax.random.normal(jax.random.key(1), (20, 4, 2, 2, 2))
  run = jax.jit(lambda x, w: flow.euler_maruyama(gaussian_velocity, x, sigmas, w))
  first = np.asarray(run(x, noise))
  np.testing.assert_array_equal(first, np.asarray(run(x, noise)))
  np.testing.assert_array_equal(first, np.asarray(run(x, noise[:-1])))  # the deterministic last step uses no row
  assert np.abs(first - np.asarray(run(x, -noise))).max() > 0.1
  keyed = jax.jit(lambda x, k: flow.euler_maruyama(gaussian_velocity, x, sigmas, key=k))
  np.testing.assert_array_equal(np.asarray(keyed(x, jax.random.key(3))), np.asarray(keyed(x, jax.random.key(3))))
  assert flow.euler_maruyama(gaussian_velocity, x.astype(jnp.bfloat16), sigmas, key=jax.random.key(3)).dtype == \
      jnp.bfloat16
  both = flow.euler_maruyama(gaussian_velocity, x, sigmas, noise, key=jax.random.key(3))  # eager; step_noise wins
  np.testing.assert_allclose(both, first, atol=1e-6)
  with pytest.raises(ValueError, match="step_noise or a PRNG key"):
    flow.euler_maruyama(gaussian_velocity, x, sigmas)
