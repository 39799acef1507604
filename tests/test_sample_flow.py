"""dit_jax.sample with flow methods end to end: a converted random DiT as the velocity model, driven by diffusers'
flow-matching schedulers (upstream transformer + upstream scheduler) from the same initial latent."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dit_jax
from dit_jax.convert.files import convert
from dit_jax.diffusion.samplers import flow_schedule, sample
from tests.helpers import rel_err
from tests.helpers.reference import diffusers_dit


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("flow")
  ref = diffusers_dit(depth=2, sample_size=8, num_classes=10, heads=2, head_dim=32, learn_sigma=False)
  ref.save_pretrained(tmp / "dit")
  convert(tmp / "dit", tmp / "ckpt")
  return ref, dit_jax.load(tmp / "ckpt")


@pytest.mark.parametrize("method,scheduler", [("euler", "FlowMatchEulerDiscreteScheduler"),
                                              ("heun", "FlowMatchHeunDiscreteScheduler")])
def test_flow_sampling_matches_diffusers_scheduler(converted, method, scheduler):
  import diffusers

  ref, ours = converted
  steps, scale, shift = 8, 3.0, 3.0
  x_T = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  y = torch.tensor([3, 7])
  sched = getattr(diffusers, scheduler)(shift=shift)
  sched.set_timesteps(steps)
  x = torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    for t in sched.timesteps:
      out = ref(torch.cat([x, x]), t.expand(4), torch.cat([y, torch.full_like(y, 10)])).sample
      cond, uncond = out.chunk(2)
      x = sched.step(uncond + scale * (cond - uncond), t, x).prev_sample
  latents = sample(ours, y.numpy(), method=method, steps=steps, cfg_scale=scale, shift=shift, flow_convention="sd3",
                   noise=x_T)
  err = rel_err(latents, x.numpy().transpose(0, 2, 3, 1))
  assert err <= 1e-4, f"{method} vs {scheduler}: rel err {err:.2e}"


def test_flow_schedules():
  np.testing.assert_allclose(flow_schedule("euler", 4, 3.0, "sd3"), [1.0, 0.857692, 0.602151, 0.008929, 0], atol=1e-6)
  np.testing.assert_allclose(flow_schedule("euler", 4, 1.0, "sit"), [1.0, 0.75, 0.5, 0.25, 0.0])
  sde = flow_schedule("sde", 250, 1.0, "sit")
  assert sde.shape == (251,) and abs(sde[-2] - 0.04) < 1e-6 and sde[-1] == 0
