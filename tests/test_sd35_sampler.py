"""dpmpp_2m_sd35 step for step against the sampler of Stability's sd3.5 reference: k-diffusion's
``sample_dpmpp_2m`` on a flow (CONST) denoiser, denoised = x - sigma v (``sd3_impls`` ``calculate_denoised``).

k-diffusion is installed without dependencies in CI (.ci/run); its ``sampling`` module needs only torch, scipy,
torchdiffeq, torchsde and tqdm. Elsewhere the test skips when k-diffusion is missing; in CI (CI set) it fails."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dit_jax.diffusion import flow
from tests.helpers import rel_err

SHAPE = (2, 4, 4, 3)
STEPS = 10
TOL = 1e-5


def k_diffusion_sampling() -> types.ModuleType:
  """``k_diffusion/sampling.py`` executed as shipped, without the package ``__init__`` (which imports the training
  stack: clip, kornia, scikit-image, wandb, ...). ``sampling`` imports ``k_diffusion.utils`` (torchvision) for
  helpers that ``sample_dpmpp_2m`` does not call; an empty stand-in takes its place while the module loads."""
  spec = importlib.util.find_spec("k_diffusion")
  if spec is None:
    message = "k-diffusion is not installed (pip install --no-deps k-diffusion torchdiffeq torchsde trampoline)"
    if os.environ.get("CI"):
      pytest.fail(message)
    pytest.skip(message)
  names = ("k_diffusion", "k_diffusion.utils", "k_diffusion.sampling")
  saved = {name: sys.modules.get(name) for name in names}
  try:
    sys.modules["k_diffusion"] = importlib.util.module_from_spec(spec)  # __path__ only, __init__ not run
    sys.modules["k_diffusion.utils"] = types.ModuleType("k_diffusion.utils")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "sampling.py"
    sub = importlib.util.spec_from_file_location("k_diffusion.sampling", path)
    module = importlib.util.module_from_spec(sub)
    sys.modules["k_diffusion.sampling"] = module
    sub.loader.exec_module(module)
  finally:
    for name, old in saved.items():
      if old is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = old
  return module


@pytest.fixture(scope="module")
def sampling():
  return k_diffusion_sampling()


def _stand_in(seed: int = 0):
  """A nonlinear, sigma-dependent velocity v(x, sigma) = tanh(x W + sigma u) - x / 2 over channels, in torch and
  in JAX, so the denoised estimate changes from step to step and the second-order correction matters."""
  rng = np.random.default_rng(seed)
  c = SHAPE[-1]
  w = (rng.standard_normal((c, c)) / np.sqrt(c)).astype(np.float32)
  u = rng.standard_normal(c).astype(np.float32)
  wt, ut = torch.from_numpy(w), torch.from_numpy(u)
  torch_fn = lambda x, sigma: torch.tanh(x @ wt + sigma * ut) - 0.5 * x
  jax_fn = lambda x, sigma: jnp.tanh(x @ w + sigma[:, None, None, None] * u) - 0.5 * x
  return torch_fn, jax_fn


def _reference_trajectory(sampling, torch_fn, x: np.ndarray, sigmas: np.ndarray) -> list[np.ndarray]:
  """k-diffusion's state before each step, then its output."""
  states = []
  denoiser = lambda x, sigma: x - sigma[:, None, None, None] * torch_fn(x, sigma[:, None, None, None])
  with torch.no_grad():
    out = sampling.sample_dpmpp_2m(denoiser, torch.from_numpy(x), torch.from_numpy(sigmas),
                                   callback=lambda info: states.append(info["x"].numpy().copy()), disable=True)
  return states + [out.numpy()]


def _our_trajectory(jax_fn, x: np.ndarray, sigmas: np.ndarray) -> list[np.ndarray]:
  """dpmpp_2m_sd35's state at each velocity call (the state before each step), then its output."""
  states = []

  def velocity(x, sigma):
    jax.debug.callback(lambda a: states.append(np.asarray(a)), x, ordered=True)
    return jax_fn(x, sigma)

  out = jax.jit(flow.dpmpp_2m_sd35, static_argnums=0)(velocity, jnp.asarray(x), jnp.asarray(sigmas))
  jax.effects_barrier()
  return states + [np.asarray(out)]


@pytest.mark.parametrize("schedule", ["flow-shift3", "flow-shift1-open"])
def test_dpmpp_2m_sd35_matches_k_diffusion_step_for_step(sampling, schedule):
  """Stability's schedule (flow_sigmas, shift 3, ending at 0: first-order last step) and an unshifted one that
  stops at sigma > 0 (second order to the end)."""
  sigmas = flow.flow_sigmas(STEPS, 3.0) if schedule == "flow-shift3" else flow.flow_sigmas(STEPS + 1, 1.0)[:-1]
  torch_fn, jax_fn = _stand_in()
  x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
  ref = _reference_trajectory(sampling, torch_fn, x, sigmas)
  ours = _our_trajectory(jax_fn, x, sigmas)
  assert len(ours) == len(ref) == STEPS + 1
  errs = [rel_err(a, b) for a, b in zip(ours, ref)]
  print(f"{schedule}: worst step rel err {max(errs):.2e}, final {errs[-1]:.2e}")
  worst = int(np.argmax(errs))
  assert max(errs) <= TOL, f"{schedule}: state after {worst} steps: rel err {errs[worst]:.2e} > {TOL:.0e} ({errs})"
  assert np.abs(ref[-1] - x).max() > 0.5  # the trajectory moved
