"""Sampling loops, each one ``lax.fori_loop`` inside a single ``jax.jit``, and the public ``sample`` entry point
for every sampled model kind: the kind (:mod:`dit_jax.kinds`) checks the condition and calls the model (DiT: class
labels; MMDiT: text embeddings with a negative and skip-layer guidance), the loop is shared.

VP (DDPM / IDDPM): ``ddpm`` (ancestral, learned or fixed variance) and ``ddim`` (eta). Flow: ``euler``, ``heun``,
``dpmpp_2m`` (diffusers' flow mode), ``dpmpp_2m_sd35`` (the Stability sd3.5 reference), ``sde`` (SiT's
Euler-Maruyama); see :mod:`dit_jax.diffusion.flow`. Stochastic samplers take either a PRNG key or
``step_noise`` of shape (steps, *latent_shape) to replay another implementation's noise draw for draw.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax import kinds
from dit_jax.diffusion import flow, guidance, meanflow, vp
from dit_jax.diffusion.vp import GaussianDiffusion, create_diffusion

VP_METHODS = vp.METHODS
FLOW_METHODS = flow.METHODS + ("meanflow", "few_step", "few_step_euler")
METHODS = VP_METHODS + FLOW_METHODS
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "euler": 50, "heun": 25, "dpmpp_2m": 50, "dpmpp_2m_sd35": 50, "sde": 250,
                 "meanflow": 1, "few_step": 4, "few_step_euler": 4}
FEW_STEP_SIGMAS = (1.0, 0.75, 0.5, 0.25)  # LADD's student noise levels (distill.ladd.times)

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x (B,H,W,C), model time (B,)) -> (B,H,W,C_out)


def _noise_at(k, shape, dtype, step_noise, key):
  if step_noise is not None:
    return step_noise[k].astype(dtype)
  return jax.random.normal(jax.random.fold_in(key, k), shape, dtype)


def _vp_mean_variance(diffusion: GaussianDiffusion, output: jax.Array, x: jax.Array, t: jax.Array):
  """(mean, log_variance, pred_x0): learned-range variance for 2C outputs, the fixed-large variance for C."""
  if output.shape[-1] == 2 * x.shape[-1]:
    return diffusion.p_mean_variance(output, x, t)
  fixed_large = np.log(np.append(diffusion.posterior_variance[1], diffusion.betas[1:]))
  pred_x0 = diffusion.predict_x0(x, t, output)
  mean, _ = diffusion.q_posterior(pred_x0, x, t)
  return mean, diffusion._at(fixed_large, t, x.ndim), pred_x0


def ddpm(diffusion: GaussianDiffusion, model_fn: ModelFn, x: jax.Array, *, step_noise=None, key=None) -> jax.Array:
  """Ancestral sampling (``p_sample_loop``): x_{t-1} = mean + [t > 0] exp(log_var / 2) z, t = T-1 .. 0."""
  n = diffusion.num_timesteps

  def step(k, x):
    i = n - 1 - k
    t = jnp.full((x.shape[0],), i, jnp.int32)
    mean, log_var, _ = _vp_mean_variance(diffusion, model_fn(x, diffusion.model_timesteps(t)), x, t)
    z = _noise_at(k, x.shape, x.dtype, step_noise, key)
    return mean + (i != 0) * jnp.exp(0.5 * log_var) * z

  return jax.lax.fori_loop(0, n, step, x)


def ddim(diffusion: GaussianDiffusion, model_fn: ModelFn, x: jax.Array, *, eta: float = 0.0, step_noise=None,
         key=None) -> jax.Array:
  """DDIM (Song et al., eq. 12) as ``ddim_sample_loop``; eta = 0 is deterministic. Ignores a learned variance."""
  n = diffusion.num_timesteps

  def step(k, x):
    i = n - 1 - k
    t = jnp.full((x.shape[0],), i, jnp.int32)
    output = model_fn(x, diffusion.model_timesteps(t))
    pred_x0 = diffusion.predict_x0(x, t, output[..., :x.shape[-1]])
    eps = diffusion.predict_eps(x, t, pred_x0)
    ab = diffusion._at(diffusion.alphas_cumprod, t, x.ndim)
    ab_prev = diffusion._at(diffusion.alphas_cumprod_prev, t, x.ndim)
    sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab)) * jnp.sqrt(1 - ab / ab_prev)
    mean = pred_x0 * jnp.sqrt(ab_prev) + jnp.sqrt(1 - ab_prev - sigma**2) * eps
    if eta == 0.0:
      return mean
    return mean + (i != 0) * sigma * _noise_at(k, x.shape, x.dtype, step_noise, key)

  return jax.lax.fori_loop(0, n, step, x)


def few_step_sigmas(steps: int) -> np.ndarray:
  """(steps + 1,) sigmas of a LADD student: the first ``steps`` of FEW_STEP_SIGMAS, then 0 (steps = 1: [1, 0])."""
  if not 1 <= steps <= len(FEW_STEP_SIGMAS):
    raise ValueError(f"few-step sampling takes 1..{len(FEW_STEP_SIGMAS)} steps (LADD's noise levels "
                     f"{FEW_STEP_SIGMAS}), got {steps}")
  return np.asarray(FEW_STEP_SIGMAS[:steps] + (0.0,), np.float32)


def few_step(velocity, x: jax.Array, sigmas: jax.Array, *, renoise: bool = True, step_noise=None,
             key=None) -> jax.Array:
  """A one-step denoiser used for a few steps: at each sigma x̂0 = x - sigma v(x, sigma); the next x is x̂0
  renoised to the next sigma, (1 - s') x̂0 + s' n. ``renoise``: fresh noise n (consistency-model / LADD-style
  sampling, what the student saw in training); otherwise the model's own noise estimate x + (1 - sigma) v, which
  is the Euler step on the same sigmas (deterministic). Returns x̂0 of the last step."""
  steps = sigmas.shape[0] - 1

  def step(k, x):
    sigma = jnp.full((x.shape[0],), sigmas[k], x.dtype)
    v = velocity(x, sigma)
    x0 = x - sigmas[k] * v
    noise = _noise_at(k, x.shape, x.dtype, step_noise, key) if renoise else x + (1 - sigmas[k]) * v
    return jnp.where(k + 1 < steps, flow.interpolate(x0, noise, sigmas[k + 1]), x0)

  return jax.lax.fori_loop(0, steps, step, x)


# ---------------------------------------------------------------------------------------------------------------
# Public entry point


def _validate(method, steps, cfg_scale, step_noise, latent_shape, respacing):
  if method not in METHODS:
    raise ValueError(f"unknown sampling method {method!r}; choose one of {', '.join(METHODS)}")
  if steps is not None and (not isinstance(steps, int | np.integer) or steps <= 0):
    raise ValueError(f"steps must be a positive integer, got {steps!r}")
  if method in VP_METHODS and steps is not None and steps > 1000 and respacing is None:
    raise ValueError(f"steps={steps} exceeds the 1000 training timesteps")
  if cfg_scale < 0:
    raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
  if step_noise is not None and tuple(step_noise.shape[1:]) != tuple(latent_shape):
    raise ValueError(f"step_noise has shape {tuple(step_noise.shape)}, expected (steps, {', '.join(map(str, latent_shape))})")


def flow_schedule(method: str, steps: int, shift: float, convention: str) -> np.ndarray:
  """(steps + 1,) descending sigmas ending in 0 for a flow method.

  'sde': SiT's grid (uniform, last step of 0.04 taken as the drift mean). 'dpmpp_2m': diffusers' DPM flow-mode
  sigmas. Otherwise: the SD3 / diffusers FlowMatchEuler schedule for the 'sd3' convention, and the uniform grid
  1 -> 0 that SiT's ODE sampler integrates for 'sit'. ``shift`` != 1 is applied as sigma' = s sigma/(1+(s-1) sigma).
  """
  if method == "dpmpp_2m":
    return flow.dpm_flow_sigmas(steps, shift)
  if convention == "sd3" and method != "sde":
    return flow.flow_sigmas(steps, shift)
  sigmas = flow.sit_sde_sigmas(steps) if method == "sde" else np.linspace(1.0, 0.0, steps + 1, dtype=np.float32)
  return np.asarray(flow.shift_sigmas(sigmas, shift), np.float32) if shift != 1.0 else sigmas


@dataclasses.dataclass(frozen=True)
class _Options:
  """Static sampling options (hashable: one compiled sampler per model structure and options)."""

  method: str
  steps: int
  cfg_scale: float
  cfg_mode: str
  interval: tuple[float, float] | None
  respacing: str | None
  eta: float
  shift: float
  convention: str
  slg: guidance.SkipLayerGuidance | None
  sigmas: tuple[float, ...] | None  # the kind's own flow schedule (FLUX), else flow_schedule(method, ...)


def _flow_solve(method, velocity, x, sigmas, step_noise, key):
  if method == "sde":
    return flow.euler_maruyama(velocity, x, sigmas, step_noise=step_noise, key=key)
  solver = {"euler": flow.euler, "heun": flow.heun, "dpmpp_2m": flow.dpmpp_2m,
            "dpmpp_2m_sd35": flow.dpmpp_2m_sd35}[method]
  return solver(velocity, x, sigmas)


@functools.lru_cache(maxsize=32)
def _compiled(graphdef, o: _Options):
  """One jitted sampler per (model structure, static options)."""
  def run(state, cond, uncond, x, step_noise, key):
    model = nnx.merge(graphdef, state)
    cfg = model.config
    kind = kinds.of(model)
    net = kind.sample_network(model)
    channels = x.shape[-1]  # latent channels (a FLUX model's in_channels count packed 2x2 channels)
    kw = dict(latent_channels=channels, mode=o.cfg_mode, interval=o.interval)
    if o.method in VP_METHODS:
      diffusion = create_diffusion(o.respacing or str(o.steps))
      model_fn = guidance.guided(net, cond, uncond, o.cfg_scale, noise_level=lambda t: t / 1000.0, **kw)
      noise_kw = dict(step_noise=step_noise, key=key)
      if o.method == "ddpm":
        return ddpm(diffusion, model_fn, x, **noise_kw)
      return ddim(diffusion, model_fn, x, eta=o.eta, **noise_kw)
    conv = flow.CONVENTIONS[o.convention]
    on_sigma = lambda f: (lambda x, sigma, c: f(x, conv.model_time(sigma), c))
    if o.method == "meanflow":  # average velocity over each step: z_r = z_t - (t - r) u(z_t, r, t)
      def u_fn(z, r, t):
        step_net = kind.sample_network(model, interval=conv.time_scale * (t[0] - r[0]))
        model_fn = guidance.guided(on_sigma(step_net), cond, uncond, o.cfg_scale, noise_level=lambda s: s, **kw)
        return conv.to_sd3_velocity(model_fn(z, t)[..., :channels])
      return meanflow.sample_steps(u_fn, x, o.steps)
    if o.method in ("few_step", "few_step_euler"):  # a LADD student: x̂0 at each of its noise levels
      model_fn = guidance.guided(on_sigma(net), cond, uncond, o.cfg_scale, noise_level=lambda s: s, **kw)
      velocity = lambda x, sigma: conv.to_sd3_velocity(model_fn(x, sigma)[..., :channels])
      return few_step(velocity, x, jnp.asarray(few_step_sigmas(o.steps)), renoise=o.method == "few_step",
                      step_noise=step_noise, key=key)
    sigmas = jnp.asarray(np.asarray(o.sigmas, np.float32) if o.sigmas is not None
                         else flow_schedule(o.method, o.steps, o.shift, o.convention))
    if o.slg is not None:
      window = jnp.asarray(o.slg.window(o.steps))
      # the step index of a schedule sigma: how many schedule entries lie above it (exact: same float32 values)
      kw.update(skip_fn=on_sigma(kind.sample_network(model, o.slg.layers)), skip_scale=o.slg.scale,
                skip_active=lambda sigma: window[jnp.minimum(jnp.sum(sigmas[:-1] > sigma[0]), o.steps - 1)])
    model_fn = guidance.guided(on_sigma(net), cond, uncond, o.cfg_scale, noise_level=lambda sigma: sigma, **kw)
    velocity = lambda x, sigma: conv.to_sd3_velocity(model_fn(x, sigma)[..., :channels])
    return _flow_solve(o.method, velocity, x, sigmas, step_noise, key)

  return jax.jit(run)


def _given(**options) -> dict:
  """The options that are set (a kind that takes none of them, such as a DiT, needs no parameter for them)."""
  return {k: v for k, v in options.items() if v is not None}


def _abstract_on(tree, sharding):
  """Shapes and dtypes of ``tree`` placed (abstractly) with ``sharding``."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def sample(model: nnx.Module, cond, key: jax.Array | None = None, *, method: str | None = None,
           steps: int | None = None, cfg_scale: float = 1.0, cfg_mode: str = "all",
           guidance_interval: tuple[float, float] | None = None, negative: Mapping | None = None,
           skip_layer_guidance: Mapping | guidance.SkipLayerGuidance | None = None,
           latent_size: tuple[int, int] | None = None, noise: jax.Array | None = None,
           step_noise: jax.Array | None = None, respacing: str | None = None, eta: float = 0.0,
           shift: float | None = None, flow_convention: str | None = None, mesh: jax.sharding.Mesh | None = None,
           lower: bool = False, encoders=None, profile: str = "diffusers", max_sequence_length: int | None = None,
           clip_skip: int | None = None, guidance: float | None = None, schedule: str | None = None) -> jax.Array:
  """Sample latents from a DiT (class labels), an MMDiT or a FLUX model (text embeddings); the whole loop runs
  in one jax.jit.

  Args:
    model: a DiT, an MMDiT or a FLUX model (``dit_jax.load``).
    cond: DiT: (B,) int class ids (``model.config.num_classes`` = the null class). MMDiT / FLUX: {"context": (B,
      L, joint_attention_dim), "pooled": (B, pooled_projection_dim)}, or prompt strings with ``encoders``.
    key: PRNG key for the initial latent and per-step noise (not needed when both are given).
    method: 'ddpm' | 'ddim' (VP, eps models; DiT only) or 'euler' | 'heun' | 'dpmpp_2m' | 'dpmpp_2m_sd35' | 'sde'
      (flow; schedules in :func:`flow_schedule`); 'meanflow' (an interval-input model, 1-2 steps); 'few_step' (a
      LADD student, 1-4 steps: x̂0 at sigmas :data:`FEW_STEP_SIGMAS`, renoised with fresh noise from ``key``) or
      'few_step_euler' (deterministic Euler on those sigmas), see :func:`few_step`. Default: 'ddpm' for a DiT,
      'euler' for an MMDiT.
    steps: sampling steps. For VP, N respaces like the original scripts (``create_diffusion(str(N))``);
      ``respacing`` ('250', 'a,b,c' or 'ddim50') overrides it. Defaults: DEFAULT_STEPS.
    cfg_scale: classifier-free guidance scale, out = u + s (c - u) (1 = none: one conditional pass; diffusers'
      guidance_scale <= 1 is 1 here; FLUX: diffusers' true_cfg_scale); cfg_mode 'all' or 'dit' (first three
      channels).
    guidance_interval: (lo, hi) noise levels in [0, 1] where guidance applies.
    negative: MMDiT / FLUX: the unconditional branch's {"context", "pooled"}, 1 or B rows (default zeros).
    skip_layer_guidance: MMDiT: {"layers": (7, 8, 9), "scale": 2.8, "start": 0.01, "stop": 0.2}; after CFG, steps
      i with start*steps < i < stop*steps add scale * (cond - cond with those blocks skipped). diffusers runs it
      only when guidance_scale > 1; here it runs whenever given.
    latent_size: MMDiT: (h, w) latent pixels (default (sample_size, sample_size)); FLUX: even (default 128, 128).
    noise: (B, H, W, C) initial latent; step_noise: (steps, B, H, W, C) per-step normals (ddpm, ddim eta>0, sde).
    shift: flow sigma shift (default 1 for a DiT, 3 for an MMDiT; FLUX: see ``schedule``, and 'resolution' for
      the latent size's mu whatever the model); flow_convention: 'sit' (t in [0,1], t=1 data; the DiT default) or
      'sd3' (t = 1000 sigma, velocity = noise - data; always for an MMDiT; FLUX: 'flux', time = sigma).
    mesh: shard the batch over every axis of this mesh (parameters replicated).
    lower: return the loop lowered for ``mesh`` (a ``jax.stages.Lowered``; the model may be abstract, the mesh's
      devices compile-only, as ``tools/plan.py --sample`` uses it) instead of running it.
    encoders, profile, max_sequence_length, clip_skip: MMDiT / FLUX from prompts: ``cond`` (and ``negative``) are
      strings encoded by :func:`dit_jax.encode_prompt` with these text encoders (:func:`dit_jax.load_text_encoders`);
      T5 tokens default to 256 (MMDiT) / 512 (FLUX). MMDiT: negative default "". FLUX (profile and clip_skip do not
      apply): the negative prompt is encoded only when cfg_scale > 1 (true CFG), default "" then.
    guidance: FLUX.1 [dev]-like models: the distilled guidance scale fed to the model (default 3.5).
    schedule: FLUX: 'diffusers' (FluxPipeline, default) or 'reference' (BFL ``get_schedule``); shifted by the
      resolution's mu for guidance-distilled models, unshifted otherwise, a constant ``shift`` if given.
  Returns:
    (B, H, W, C) final latents, float32.
  """
  if lower and mesh is None:
    raise ValueError("lower=True needs a mesh")
  if isinstance(cond, str) or (isinstance(cond, (list, tuple)) and cond and isinstance(cond[0], str)):
    from dit_jax.text.conditioning import prompt_cond
    cond, negative = prompt_cond(model.config, encoders, cond, negative, cfg_scale=cfg_scale, profile=profile,
                                 max_sequence_length=max_sequence_length, clip_skip=clip_skip)
  if isinstance(shift, str) and not (shift == "resolution" and kinds.of(model).resolution_shift):
    raise ValueError(f"shift must be a number > 0{' (or resolution for FLUX)' if shift == 'resolution' else ''}, "
                     f"got {shift!r}")
  spec = kinds.of(model).prepare_sample(model.config, cond, method=method, shift=shift,
                                        flow_convention=flow_convention, negative=negative,
                                        skip_layer_guidance=skip_layer_guidance, latent_size=latent_size,
                                        **_given(guidance=guidance, schedule=schedule))
  method, latent_shape = spec.method, spec.latent_shape
  _validate(method, steps, cfg_scale, step_noise, latent_shape, respacing)
  if not spec.shift > 0:  # also NaN; a shift <= 0 turns the flow schedule into garbage (all-zero images)
    raise ValueError(f"shift must be > 0, got {spec.shift}")
  steps = steps or DEFAULT_STEPS[method]
  if method in ("few_step", "few_step_euler"):
    few_step_sigmas(steps)  # 1..4 steps
  if method in VP_METHODS:
    num = create_diffusion(respacing or str(steps)).num_timesteps
  else:
    num = steps
  if step_noise is not None and step_noise.shape[0] != num:
    raise ValueError(f"step_noise has {step_noise.shape[0]} steps, the sampler takes {num}")
  draws_noise = method in ("ddpm", "sde", "few_step") or (method == "ddim" and eta > 0)
  if key is None:
    if noise is None or (draws_noise and step_noise is None):
      raise ValueError(f"{method} needs a PRNG key (or an initial latent `noise` and, if stochastic, `step_noise`)")
    key = jax.random.key(0)  # unused: every draw is given
  init_key, loop_key = jax.random.split(key)
  x = jnp.asarray(noise, jnp.float32) if noise is not None else jax.random.normal(init_key, latent_shape)
  if x.shape != latent_shape:
    raise ValueError(f"noise has shape {tuple(x.shape)}, expected {latent_shape}")
  graphdef, state = nnx.split(model)
  interval = tuple(float(v) for v in guidance_interval) if guidance_interval is not None else None
  sigmas = tuple(float(s) for s in spec.schedule(steps)) if spec.schedule is not None else None
  fn = _compiled(graphdef, _Options(method, steps, float(cfg_scale), cfg_mode, interval, respacing, float(eta),
                                    float(spec.shift), spec.flow_convention, spec.slg, sigmas))
  cond, uncond = jax.tree.map(jnp.asarray, (spec.cond, spec.uncond))
  step_noise = jnp.asarray(step_noise, jnp.float32) if step_noise is not None else None
  if mesh is not None:
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
    steps_batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, mesh.axis_names))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    place = _abstract_on if lower else jax.device_put
    state = place(state, replicated)
    cond, uncond, x = place((cond, uncond, x), batch)
    step_noise = place(step_noise, steps_batch) if step_noise is not None else None
    if lower:
      with jax.set_mesh(mesh):
        return fn.lower(state, cond, uncond, x, step_noise, _abstract_on(loop_key, replicated))
    with jax.set_mesh(mesh):  # traced for the mesh's devices (attention picks its kernel from them)
      return fn(state, cond, uncond, x, step_noise, loop_key)
  return fn(state, cond, uncond, x, step_noise, loop_key)
