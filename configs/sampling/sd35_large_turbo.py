"""SD3.5 Large Turbo sampling preset: 4 flow-match Euler steps at shift 3 without classifier-free guidance.

'reference': Stability-AI/sd3.5 ``sd3_infer.py`` CONFIGS["sd3.5_large_turbo"] (Euler, shift 3, 4 steps, CFG 1).
'diffusers': the model card's pipeline call (num_inference_steps=4, guidance_scale=0.0, i.e. no CFG: 1 here).
"""
from dit_jax.presets import make_preset

FLAVOURS = {
    "reference": dict(method="euler", steps=4, shift=3.0, cfg_scale=1.0, skip_layer_guidance=None),
    "diffusers": dict(method="euler", steps=4, shift=3.0, cfg_scale=1.0, skip_layer_guidance=None),
}


def get_config(flavour: str = "reference"):
  return make_preset(FLAVOURS, flavour)
