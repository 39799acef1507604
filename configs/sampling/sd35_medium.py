"""SD3.5 Medium sampling preset, with skip-layer guidance over blocks 7, 8, 9 on steps in (0.01, 0.2) * steps.

'reference': Stability-AI/sd3.5 ``sd3_infer.py`` CONFIGS["sd3.5_medium"] (DPM++ 2M, shift 3, 50 steps, CFG 5) and its
skip_layer_config (scale 2.5; the reference turns it on with --skip_layer_cfg True). 'diffusers':
StableDiffusion3Pipeline defaults (flow-match Euler, 28 steps, guidance 7) with skip_guidance_layers [7, 8, 9] at
its default skip_layer_guidance_scale 2.8.
"""
from dit_jax.presets import make_preset

FLAVOURS = {
    "reference": dict(method="dpmpp_2m_sd35", steps=50, shift=3.0, cfg_scale=5.0,
                      skip_layer_guidance=dict(layers=[7, 8, 9], scale=2.5, start=0.01, stop=0.2)),
    "diffusers": dict(method="euler", steps=28, shift=3.0, cfg_scale=7.0,
                      skip_layer_guidance=dict(layers=[7, 8, 9], scale=2.8, start=0.01, stop=0.2)),
}


def get_config(flavour: str = "reference"):
  return make_preset(FLAVOURS, flavour)
