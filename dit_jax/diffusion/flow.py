"""Rectified flow (SD3, SiT): the path, training-time noise levels, shifts, sigma schedules and samplers.

Convention (SD3 / diffusers, used by every function here): sigma in [0, 1] is the noise level, sigma = 1 is pure
noise, and

  x_sigma = (1 - sigma) x0 + sigma noise,     v = dx_sigma / dsigma = noise - x0.

SiT (Ma et al. 2024, ``transport/``) runs time the other way: t = 1 - sigma, t = 0 noise, t = 1 data, and its
velocity is dx/dt = x0 - noise = -v. SD3's MMDiT is fed the timestep 1000 sigma, SiT's the continuous t in [0, 1],
FLUX sigma itself (it multiplies by 1000 inside). :class:`FlowConvention` converts a model's time and output;
:data:`SD3`, :data:`SIT` and :data:`FLUX` are the instances.

Samplers take ``velocity_fn(x, sigma) -> v`` with x (B, H, W, C) and sigma (B,), v in the SD3 convention, and a
descending sigma array (steps + 1,), normally ending at 0. Each runs as one ``lax.scan`` (jittable as a whole),
computes in float32 and returns x in the input dtype.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x (B,H,W,C) f32, sigma (B,) f32) -> v (B,H,W,C)

_EPS = 1e-6  # sample_sigmas keeps sigma in [_EPS, 1 - _EPS]


# ---------------------------------------------------------------------------------------------------------------
# Path and conventions


def _expand(sigma, x: jax.Array) -> jax.Array:
  """(B,) or scalar sigma -> broadcastable against x (B, ...)."""
  sigma = jnp.asarray(sigma, jnp.float32)
  return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def interpolate(x0: jax.Array, noise: jax.Array, sigma) -> jax.Array:
  """x_sigma = (1 - sigma) x0 + sigma noise; x0, noise (B, H, W, C), sigma (B,) or scalar."""
  s = _expand(sigma, x0)
  return (1 - s) * x0 + s * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
  """Conditional flow-matching target of SD3 (CFM, eq. 3 of Esser et al. 2024): v = noise - x0."""
  return noise - x0


@dataclasses.dataclass(frozen=True)
class FlowConvention:
  """How a velocity model reads time and what its output means, relative to the SD3 convention.

  model time = time_scale * (1 - sigma if reverse_time else sigma); v_sd3 = velocity_sign * model output.
  """

  name: str
  time_scale: float
  reverse_time: bool
  velocity_sign: float

  def model_time(self, sigma) -> jax.Array:
    """(B,) noise levels -> the timestep the model was trained on (SD3: 1000 sigma; SiT: 1 - sigma)."""
    s = jnp.asarray(sigma, jnp.float32)
    return self.time_scale * ((1 - s) if self.reverse_time else s)

  def to_sd3_velocity(self, model_output: jax.Array) -> jax.Array:
    """Model output -> v = noise - x0 (SD3: unchanged; SiT: negated)."""
    return model_output if self.velocity_sign > 0 else -model_output


SD3 = FlowConvention("sd3", time_scale=1000.0, reverse_time=False, velocity_sign=1.0)
SIT = FlowConvention("sit", time_scale=1.0, reverse_time=True, velocity_sign=-1.0)
FLUX = FlowConvention("flux", time_scale=1.0, reverse_time=False, velocity_sign=1.0)  # takes sigma, x1000 inside
CONVENTIONS = {"sd3": SD3, "sit": SIT, "flux": FLUX}
METHODS = ("euler", "heun", "dpmpp_2m", "dpmpp_2m_sd35", "sde")  # the flow samplers


# ---------------------------------------------------------------------------------------------------------------
# Training-time noise levels


def sample_sigmas(key: jax.Array, shape, sampler: str = "logit_normal", loc: float = 0.0, scale: float = 1.0,
                  mode_scale: float = 1.29) -> jax.Array:
  """Noise levels for training (SD3 paper §3.1), float32 in [1e-6, 1 - 1e-6].

  sampler:
    'logit_normal': sigmoid(u), u ~ N(loc, scale) (rf/lognorm(0, 1) ranks best in the paper's Table 1);
    'mode': f_mode(u; s) = 1 - u - s (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1), s = mode_scale (monotone for
      -1 <= s <= 2 / (pi - 2); s = 0 is uniform);
    'uniform': U(0, 1).
  """
  shape = (shape,) if isinstance(shape, int) else tuple(shape)
  if sampler == "logit_normal":
    sigma = jax.nn.sigmoid(loc + scale * jax.random.normal(key, shape, jnp.float32))
  elif sampler in ("uniform", "mode"):
    u = jax.random.uniform(key, shape, jnp.float32)
    sigma = u if sampler == "uniform" else 1 - u - mode_scale * (jnp.cos(jnp.pi * u / 2) ** 2 - 1 + u)
  else:
    raise ValueError(f"unknown sigma sampling kind {sampler!r}: use 'logit_normal', 'mode' or 'uniform'")
  return jnp.clip(sigma, _EPS, 1 - _EPS)


# ---------------------------------------------------------------------------------------------------------------
# Shifts


def shift_sigmas(sigma, shift: float):
  """Timestep shift shift sigma / (1 + (shift - 1) sigma): log-SNR moved by -2 log(shift) (numpy or jax)."""
  return shift * sigma / (1 + (shift - 1) * sigma)


def resolution_shift(num_tokens: int, base_tokens: int = 256) -> float:
  """SD3 paper's resolution-dependent shift alpha = sqrt(m / n), m = num_tokens at the target resolution and
  n = base_tokens at the base one (256 = 16 x 16 patches of a 256 px image with an 8x VAE and 2x2 patches).

  1024 px (4096 tokens) gives 4; the paper settled on 3.0 at 1024 px by human preference.
  """
  return math.sqrt(num_tokens / base_tokens)


def time_shift_exponential(mu: float, sigma_exp: float, t):
  """Flux / diffusers dynamic shift e^mu / (e^mu + (1/t - 1)^sigma_exp); sigma_exp 1 is shift_sigmas(t, e^mu)."""
  return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma_exp)


def dynamic_shift_mu(num_tokens: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                     max_shift: float = 1.15) -> float:
  """mu for :func:`time_shift_exponential`, linear in the token count (diffusers ``calculate_shift``)."""
  slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
  return base_shift + slope * (num_tokens - base_seq_len)


# ---------------------------------------------------------------------------------------------------------------
# Sigma schedules


def flow_sigmas(steps: int, shift: float = 3.0, *, mu: float | None = None,
                num_train_timesteps: int = 1000) -> np.ndarray:
  """(steps + 1,) float32, descending from 1.0 to a final 0: Stability's ``ModelSamplingDiscreteFlow.get_sigmas``
  and diffusers' ``FlowMatchEulerDiscreteScheduler(shift).set_timesteps(steps).sigmas``.

  Both space ``steps`` timesteps linearly from 1000 down to 1000 sigma(1) of the *shifted* training table and then
  shift again, so the last non-zero sigma is shift(shift(1/1000)) (0.008929 at shift 3), not shift(1/1000).
  With ``mu`` (diffusers ``use_dynamic_shifting``) the table is unshifted and the second shift is
  ``time_shift_exponential(mu, 1, .)``. The linspace runs in float64, as in diffusers.
  """
  n = num_train_timesteps
  first = np.float32(1) / np.float32(n)  # the smallest training sigma, in float32 like the references' tables
  sigma_min = float(first if mu is not None else shift_sigmas(first, np.float32(shift)))
  sigmas = np.linspace(n, sigma_min * n, steps) / n
  sigmas = time_shift_exponential(mu, 1.0, sigmas) if mu is not None else shift_sigmas(sigmas, shift)
  return np.append(sigmas.astype(np.float32), np.float32(0))


def flux_sigmas(steps: int, mu: float | None = None, *, shift: float | None = None,
                flavour: str = "diffusers") -> np.ndarray:
  """(steps + 1,) float32 FLUX.1 sigmas from 1 to 0: t = linspace(1, 0, steps + 1) shifted by
  :func:`time_shift_exponential` with ``mu`` (dev: :func:`dynamic_shift_mu` of the image tokens), by the constant
  ``shift`` instead, or not at all (schnell).

  The flavours are the same schedule computed as each reference does: 'reference' is BFL's ``get_schedule``
  (a float32 linspace over steps + 1 points, the final 0 shifted to 0); 'diffusers' is FluxPipeline's
  ``linspace(1, 1 / steps, steps)`` in float64, cast to float32 and shifted by ``FlowMatchEulerDiscreteScheduler``,
  then a 0 appended.
  """
  if flavour not in FLUX_SCHEDULES:
    raise ValueError(f"unknown FLUX schedule {flavour!r}; choose one of {', '.join(FLUX_SCHEDULES)}")
  if mu is not None and shift is not None:
    raise ValueError("give mu (dynamic shift) or shift, not both")
  if flavour == "reference":
    t = np.linspace(1, 0, steps + 1, dtype=np.float32)
  else:
    t = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
  with np.errstate(divide="ignore"):
    if mu is not None:
      t = time_shift_exponential(mu, 1.0, t).astype(np.float32)
    elif shift is not None and shift != 1.0:
      t = shift_sigmas(t, np.float32(shift)).astype(np.float32)
  return t if flavour == "reference" else np.append(t, np.float32(0))


FLUX_SCHEDULES = ("reference", "diffusers")


def dpm_flow_sigmas(steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> np.ndarray:
  """(steps + 1,) float32: the sigmas of diffusers' ``DPMSolverMultistepScheduler(use_flow_sigmas=True,
  flow_shift=shift)`` (final_sigmas_type 'zero').

  Unlike :func:`flow_sigmas` this shifts once and starts below 1: shift(1 - a) for a = linspace(1, 1/1000,
  steps + 1), reversed, the 0 from a = 1 dropped and a 0 appended, i.e. [shift(0.999), ..., shift(0.999 / steps),
  0]. That scheduler hands the model int64(1000 sigma), truncated, as its timestep.
  """
  alphas = np.linspace(1, 1 / num_train_timesteps, steps + 1)
  sigmas = shift_sigmas(1.0 - alphas, shift)[::-1][:-1]
  return np.append(sigmas, 0.0).astype(np.float32)


def sit_sde_sigmas(num_steps: int = 250, last_step_size: float = 0.04) -> np.ndarray:
  """SiT's SDE grid in sigma: 1 - linspace(0, 1 - last_step_size, num_steps), then 0 for the last step.

  SiT (Linear path, velocity model, diffusion form 'sigma') integrates t = linspace(t0 = 0, t1, num_steps) with
  t1 = 1 - last_step_size: num_steps - 1 Euler-Maruyama steps, then one deterministic last step of size
  last_step_size from t1 to 1; num_steps model calls in all. last_step_size 0 (SiT's last_step None) gives
  t1 = 1 and no extra entry: num_steps - 1 Euler-Maruyama steps ending at sigma = 0.
  """
  t = np.linspace(0.0, 1.0 - last_step_size, num_steps)
  sigmas = 1.0 - t
  if last_step_size > 0:
    sigmas = np.append(sigmas, 0.0)
  return sigmas.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Samplers


def _prepare(x: jax.Array, sigmas) -> tuple[jax.Array, jax.Array]:
  sigmas = jnp.asarray(sigmas, jnp.float32)
  if sigmas.ndim != 1 or sigmas.shape[0] < 2:
    raise ValueError(f"sigmas must be a 1-D array of at least 2 noise levels, got shape {sigmas.shape}")
  return x.astype(jnp.float32), sigmas


def _velocity(velocity_fn: VelocityFn, x: jax.Array, sigma: jax.Array) -> jax.Array:
  return velocity_fn(x, jnp.full((x.shape[0],), sigma, jnp.float32)).astype(jnp.float32)


def euler(velocity_fn: VelocityFn, x: jax.Array, sigmas) -> jax.Array:
  """Flow-matching Euler: x += v (sigma_{i+1} - sigma_i) (Stability ``sample_euler``, diffusers
  ``FlowMatchEulerDiscreteScheduler``). x: (B, H, W, C) at sigmas[0]; sigmas: (steps + 1,)."""
  dtype = x.dtype
  x, sigmas = _prepare(x, sigmas)

  def step(x, pair):
    sigma, sigma_next = pair
    return x + (sigma_next - sigma) * _velocity(velocity_fn, x, sigma), None

  x, _ = jax.lax.scan(step, x, (sigmas[:-1], sigmas[1:]))
  return x.astype(dtype)


def heun(velocity_fn: VelocityFn, x: jax.Array, sigmas) -> jax.Array:
  """Heun's second-order method (predictor-corrector), as diffusers' ``FlowMatchHeunDiscreteScheduler``:
  x' = x + dt v(x, sigma); x += dt (v(x, sigma) + v(x', sigma_next)) / 2, and the plain Euler step x' when
  sigma_next = 0. 2 steps - 1 model calls for a schedule ending at 0."""
  dtype = x.dtype
  x, sigmas = _prepare(x, sigmas)

  def step(x, pair):
    sigma, sigma_next = pair
    dt = sigma_next - sigma
    v = _velocity(velocity_fn, x, sigma)
    x_euler = x + dt * v
    corrected = lambda: x + dt * (0.5 * (v + _velocity(velocity_fn, x_euler, sigma_next)))
    return jax.lax.cond(sigma_next == 0, lambda: x_euler, corrected), None

  x, _ = jax.lax.scan(step, x, (sigmas[:-1], sigmas[1:]))
  return x.astype(dtype)


def _lambda_flow(sigma: jax.Array) -> jax.Array:
  """Half log-SNR of the flow path, log(alpha / sigma) with alpha = 1 - sigma (+inf at sigma = 0)."""
  return jnp.log(1 - sigma) - jnp.log(sigma)


def _lambda_ve(sigma: jax.Array) -> jax.Array:
  """k-diffusion's t = -log sigma, the half log-SNR of a VE path x0 + sigma noise."""
  return -jnp.log(sigma)


def _dpmpp_2m(velocity_fn: VelocityFn, x: jax.Array, sigmas, lam: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """DPM-Solver++(2M) on the data prediction D = x - sigma v, with step sizes h measured in ``lam``.

  x_{i+1} = r x_i + (1 - r) D', r = sigma_{i+1} / sigma_i, D' = D_i + (D_i - D_{i-1}) h_i / (2 h_{i-1}), and
  D' = D_i (first order) on the first step and when sigma_{i+1} = 0.
  """
  dtype = x.dtype
  x, sigmas = _prepare(x, sigmas)
  lams = lam(sigmas)

  def step(carry, i):
    x, d_prev = carry
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    d = x - sigma * _velocity(velocity_fn, x, sigma)
    second = (i > 0) & (sigma_next > 0)
    h, h_prev = lams[i + 1] - lams[i], lams[i] - lams[jnp.maximum(i - 1, 0)]
    c = jnp.where(second, h / jnp.where(second, 2 * h_prev, 1.0), 0.0)
    ratio = sigma_next / sigma
    return (ratio * x + (1 - ratio) * (d + c * (d - d_prev)), d), None

  (x, _), _ = jax.lax.scan(step, (x, jnp.zeros_like(x)), jnp.arange(sigmas.shape[0] - 1))
  return x.astype(dtype)


def dpmpp_2m(velocity_fn: VelocityFn, x: jax.Array, sigmas) -> jax.Array:
  """DPM-Solver++(2M) as diffusers' ``DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type=
  'flow_prediction', algorithm_type='dpmsolver++', solver_order=2)`` (midpoint, lower-order final step).

  Step sizes are measured in the flow's own half log-SNR lambda = log((1 - sigma) / sigma). The first-order part
  r x + (1 - r) D is exactly the Euler step, so this differs from :func:`dpmpp_2m_sd35` only in the multistep
  correction's ratio h_i / h_{i-1}. diffusers' own schedule is :func:`dpm_flow_sigmas`, not :func:`flow_sigmas`.
  """
  return _dpmpp_2m(velocity_fn, x, sigmas, _lambda_flow)


def dpmpp_2m_sd35(velocity_fn: VelocityFn, x: jax.Array, sigmas) -> jax.Array:
  """DPM-Solver++(2M) as Stability's sd3.5 reference (``sd3_impls.sample_dpmpp_2m``, k-diffusion's
  ``sample_dpmpp_2m``) runs it on flow sigmas: the VE form, step sizes in t = -log sigma, with ``flow_sigmas``.

  It treats x as x0 + sigma noise although the flow path scales x0 by 1 - sigma; the Euler part agrees with
  :func:`dpmpp_2m`, the second-order correction uses ratios of log-sigma steps instead of log-SNR steps.
  """
  return _dpmpp_2m(velocity_fn, x, sigmas, _lambda_ve)


def euler_maruyama(velocity_fn: VelocityFn, x: jax.Array, sigmas, step_noise: jax.Array | None = None, *,
                   key: jax.Array | None = None, diffusion_norm: float = 1.0, last_step: str | None = "mean"
                   ) -> jax.Array:
  """SiT's SDE sampler (``Sampler.sample_sde``: Euler-Maruyama, diffusion form 'sigma', Linear path) in sigma.

  With t = 1 - sigma, SiT integrates dx = [u + w_t s] dt + sqrt(2 w_t) dW forward in t, where u = -v is its
  velocity, s = (t u - x) / (1 - t) = -(x + (1 - sigma) v) / sigma the score from the velocity, and
  w_t = diffusion_norm sigma. So w_t s = -diffusion_norm (x + (1 - sigma) v) needs no division, and per step
  (dt = sigma_i - sigma_{i+1} > 0):

    f = -v - diffusion_norm (x + (1 - sigma) v);   x <- x + f dt + sqrt(2 diffusion_norm sigma dt) z.

  The last step (sigma_{n-1} -> sigma_n) is deterministic unless last_step is None:
    'mean' (SiT default): x + f dt, the drift without noise; 'euler': x + v (sigma_n - sigma_{n-1});
    'tweedie': x - sigma v, the denoised estimate. None: an Euler-Maruyama step like the others.
  Use :func:`sit_sde_sigmas` for SiT's grid (250 steps, last step 0.04).

  Args:
    sigmas: (steps + 1,) descending noise levels.
    step_noise: (steps, *x.shape) standard normals z, row i for step i; its last row is unused when the last step
      is deterministic (steps - 1 rows are also accepted then).
    key: used when step_noise is None: step i draws ``normal(fold_in(key, i), x.shape)``.
  """
  if last_step not in ("mean", "euler", "tweedie", None):
    raise ValueError(f"unknown last_step {last_step!r}: use 'mean', 'euler', 'tweedie' or None")
  if step_noise is None and key is None:
    raise ValueError("euler_maruyama needs step_noise or a PRNG key")
  dtype = x.dtype
  x, sigmas = _prepare(x, sigmas)
  steps = sigmas.shape[0] - 1
  n_sde = steps - 1 if last_step else steps
  if step_noise is not None:
    if step_noise.shape[1:] != x.shape or step_noise.shape[0] not in (n_sde, steps):
      raise ValueError(f"step_noise must have shape ({steps}, *{x.shape}), got {step_noise.shape}")
    draws = jnp.asarray(step_noise)[:n_sde]
  else:
    draws = jnp.arange(n_sde)

  def drift(x, sigma):
    v = _velocity(velocity_fn, x, sigma)
    return -v - diffusion_norm * (x + (1 - sigma) * v), v

  def step(x, inputs):
    sigma, sigma_next, draw = inputs
    dt = sigma - sigma_next
    z = draw.astype(jnp.float32) if step_noise is not None else jax.random.normal(
        jax.random.fold_in(key, draw), x.shape, jnp.float32)
    f, _ = drift(x, sigma)
    return x + f * dt + jnp.sqrt(2 * diffusion_norm * sigma * dt) * z, None

  x, _ = jax.lax.scan(step, x, (sigmas[:n_sde], sigmas[1:n_sde + 1], draws))
  if last_step:
    sigma, sigma_next = sigmas[-2], sigmas[-1]
    f, v = drift(x, sigma)
    if last_step == "mean":
      x = x + f * (sigma - sigma_next)
    elif last_step == "euler":
      x = x + v * (sigma_next - sigma)
    else:
      x = x - sigma * v
  return x.astype(dtype)
