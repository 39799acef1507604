"""Variance-preserving (DDPM / IDDPM) diffusion as in facebookresearch/DiT's ``diffusion/`` package.

Tables are float64 numpy (as the original), looked up per timestep and cast to float32; all arithmetic on
tensors is float32. Arrays are channels-last: x (B, H, W, C); a learned-sigma model outputs (B, H, W, 2C) as
[eps, v] where v in [-1, 1] interpolates the log-variance between the posterior variance and beta.

    diffusion = create_diffusion("250")        # respaced like the original sample.py
    diffusion.timestep_map                      # respaced index -> original timestep the model sees
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
  """Ho et al.'s linear schedule, scaled to keep its shape for any number of steps (float64)."""
  scale = 1000 / num_timesteps
  return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int = 1000, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal's cosine schedule ('squaredcos_cap_v2'), float64."""
  alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
                   for i in range(num_timesteps)])


SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}
METHODS = ("ddpm", "ddim")  # the VP sampling loops (dit_jax.diffusion.samplers)


def space_timesteps(num_timesteps: int, spec: str | list[int]) -> list[int]:
  """The original timesteps kept by a respacing, ascending.

  ``"ddimN"``: the first integer stride giving exactly N steps from 0 (never includes T-1).
  ``"N"`` or ``"a,b,c"``: split [0, T) into equal sections and take evenly spaced steps (Python's round) in each.
  """
  if isinstance(spec, str) and spec.startswith("ddim"):
    desired = _positive_int(spec[4:], spec)
    for stride in range(1, num_timesteps):
      if len(range(0, num_timesteps, stride)) == desired:
        return list(range(0, num_timesteps, stride))
    raise ValueError(f"respacing {spec!r}: cannot take exactly {desired} of {num_timesteps} steps with an "
                     "integer stride")
  counts = [_positive_int(c, spec) for c in spec.split(",")] if isinstance(spec, str) else list(spec)
  size_per, extra = divmod(num_timesteps, len(counts))
  start, steps = 0, []
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if size < count:
      raise ValueError(f"respacing {spec!r}: cannot take {count} steps from a section of {size}")
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    cur = 0.0
    for _ in range(count):
      steps.append(start + round(cur))
      cur += stride
    start += size
  return sorted(set(steps))


def _positive_int(text: str, spec) -> int:
  try:
    value = int(text)
  except ValueError:
    raise ValueError(f"respacing {spec!r} is not 'N', 'a,b,c' or 'ddimN'") from None
  if value <= 0:
    raise ValueError(f"respacing {spec!r}: step counts must be positive")
  return value


def _broadcast(values: jax.Array, ndim: int) -> jax.Array:
  return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def mean_flat(x: jax.Array) -> jax.Array:
  return x.mean(axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _tanh(a):
  """tanh accurate to a few ulp in the tails (XLA's CPU tanh is off by up to 2.6e-7 and saturates to +-1 near
  |a| = 8, torch's only near 9); through exp for |a| >= 0.5. The decoder NLL takes log(1 - cdf) of it."""
  b = jnp.minimum(jnp.abs(a), 20.0)
  return jnp.where(jnp.abs(a) < 0.5, jnp.tanh(a), jnp.sign(a) * (1 - 2 / (jnp.exp(2 * b) + 1)))


def approx_standard_normal_cdf(x):
  """The tanh approximation of the standard normal CDF used by IDDPM."""
  return 0.5 * (1.0 + _tanh(np.float32(math.sqrt(2.0 / math.pi)) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """log P(x) under N(means, e^{2 log_scales}) discretised to 256 bins on [-1, 1] (IDDPM), in nats."""
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
  """A (possibly respaced) VP process with epsilon prediction and learned-range variance.

  Attributes are float64 numpy tables indexed by the (respaced) step index; ``timestep_map[i]`` is the original
  timestep passed to the model for index i.
  """

  def __init__(self, betas: np.ndarray, timestep_map: np.ndarray | None = None):
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
      raise ValueError("betas must be a 1-D array in (0, 1]")
    self.betas = betas
    self.num_timesteps = len(betas)
    self.timestep_map = np.arange(len(betas)) if timestep_map is None else np.asarray(timestep_map)
    alphas = 1.0 - betas
    ac = self.alphas_cumprod = np.cumprod(alphas)
    self.alphas_cumprod_prev = np.append(1.0, ac[:-1])
    self.alphas_cumprod_next = np.append(ac[1:], 0.0)
    self.sqrt_alphas_cumprod = np.sqrt(ac)
    self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
    self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
    self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)
    self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - ac)
    pv = self.posterior_variance
    self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:])) if len(pv) > 1 else np.array([])
    self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - ac)
    self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - ac)
    self.log_betas = np.log(betas)

  # -- table lookup --------------------------------------------------------------------------------------------
  def _at(self, table: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
    """table[t] as float32, broadcast to rank ``ndim`` (f64 table indexed, then rounded, as the original)."""
    return _broadcast(jnp.asarray(table.astype(np.float32))[t], ndim)

  def model_timesteps(self, t: jax.Array) -> jax.Array:
    """Respaced indices -> the original timesteps (float32) the model was trained on."""
    return jnp.asarray(self.timestep_map, dtype=jnp.float32)[t]

  # -- forward process -------------------------------------------------------------------------------------------
  def q_sample(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    return (self._at(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

  def q_posterior(self, x0: jax.Array, x_t: jax.Array, t: jax.Array):
    """Mean and clipped log-variance of q(x_{t-1} | x_t, x0)."""
    n = x_t.ndim
    mean = self._at(self.posterior_mean_coef1, t, n) * x0 + self._at(self.posterior_mean_coef2, t, n) * x_t
    return mean, self._at(self.posterior_log_variance_clipped, t, n)

  # -- reverse process -------------------------------------------------------------------------------------------
  def predict_x0(self, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    n = x_t.ndim
    return self._at(self.sqrt_recip_alphas_cumprod, t, n) * x_t - self._at(self.sqrt_recipm1_alphas_cumprod, t, n) * eps

  def predict_eps(self, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
    n = x_t.ndim
    return ((self._at(self.sqrt_recip_alphas_cumprod, t, n) * x_t - x0)
            / self._at(self.sqrt_recipm1_alphas_cumprod, t, n))

  def learned_log_variance(self, v: jax.Array, t: jax.Array) -> jax.Array:
    """Learned-range log-variance: v in [-1, 1] interpolates log(posterior var) .. log(beta) (not clamped)."""
    frac = (v + 1) / 2
    return frac * self._at(self.log_betas, t, v.ndim) + (1 - frac) * self._at(
        self.posterior_log_variance_clipped, t, v.ndim)

  def p_mean_variance(self, model_output: jax.Array, x_t: jax.Array, t: jax.Array, clip_denoised: bool = False):
    """From a learned-sigma output (B, H, W, 2C): (mean, log_variance, pred_x0) of p(x_{t-1} | x_t)."""
    eps, v = jnp.split(model_output, 2, axis=-1)
    log_variance = self.learned_log_variance(v, t)
    pred_x0 = self.predict_x0(x_t, t, eps)
    if clip_denoised:
      pred_x0 = jnp.clip(pred_x0, -1, 1)
    mean, _ = self.q_posterior(pred_x0, x_t, t)
    return mean, log_variance, pred_x0

  # -- training loss -----------------------------------------------------------------------------------------
  def vb_terms_bpd(self, model_output: jax.Array, x0: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """Per-example VLB term in bits: KL(q || p) for t > 0, the discretised decoder NLL at t = 0."""
    true_mean, true_log_var = self.q_posterior(x0, x_t, t)
    mean, log_var, _ = self.p_mean_variance(model_output, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / np.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / np.log(2.0)
    return jnp.where(t == 0, nll, kl)

  def training_losses(self, model_fn, x0: jax.Array, t: jax.Array, noise: jax.Array) -> dict[str, jax.Array]:
    """The DiT hybrid loss: eps-MSE + VLB (in bits) that trains only the variance channels.

    Args:
      model_fn: (x_t, model_timesteps) -> (B, H, W, 2C) learned-sigma output.
      x0: (B, H, W, C) clean latents; t: (B,) int step indices; noise: like x0.
    Returns:
      {"loss", "mse", "vb"}, each (B,).
    """
    x_t = self.q_sample(x0, t, noise)
    output = model_fn(x_t, self.model_timesteps(t))
    eps, v = jnp.split(output, 2, axis=-1)
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps), v], axis=-1)
    vb = self.vb_terms_bpd(frozen, x0, x_t, t)
    mse = mean_flat((noise - eps) ** 2)
    return {"loss": mse + vb, "mse": mse, "vb": vb}


def create_diffusion(respacing: str | None = "", schedule: str = "linear", num_timesteps: int = 1000
                     ) -> GaussianDiffusion:
  """The diffusion the original scripts build: ``create_diffusion("")`` for training, ``(str(steps))`` to sample.

  Like the original, the betas are always re-derived from the kept steps' cumulative alphas (also when all steps
  are kept), so every table, including the learned-range upper bound log(beta), is respaced.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
  base = GaussianDiffusion(SCHEDULES[schedule](num_timesteps))
  kept = set(space_timesteps(num_timesteps, respacing or [num_timesteps]))
  new_betas, timestep_map, last = [], [], 1.0
  for i, ac in enumerate(base.alphas_cumprod):
    if i in kept:
      new_betas.append(1 - ac / last)
      last = ac
      timestep_map.append(i)
  return GaussianDiffusion(np.array(new_betas), np.array(timestep_map))
