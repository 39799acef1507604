"""SD3.5 Large sampling preset.

'reference': Stability-AI/sd3.5 ``sd3_infer.py`` CONFIGS["sd3.5_large"] (DPM++ 2M, shift 3, 40 steps, CFG 4.5).
'diffusers': StableDiffusion3Pipeline defaults (flow-match Euler, 28 steps, guidance 7, scheduler shift 3).
"""
from dit_jax.presets import make_preset

FLAVOURS = {
    "reference": dict(method="dpmpp_2m_sd35", steps=40, shift=3.0, cfg_scale=4.5, skip_layer_guidance=None),
    "diffusers": dict(method="euler", steps=28, shift=3.0, cfg_scale=7.0, skip_layer_guidance=None),
}


def get_config(flavour: str = "reference"):
  return make_preset(FLAVOURS, flavour)
