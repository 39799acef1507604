"""SD3 Medium sampling preset.

'reference': Stability-AI/sd3.5 ``sd3_infer.py`` CONFIGS["sd3_medium"] (DPM++ 2M as the reference runs it, shift
1.0, 50 steps, CFG 5; the older sd3-ref repository used Euler with shift 3). 'diffusers': StableDiffusion3Pipeline
defaults (flow-match Euler, 28 steps, guidance 7) with the released scheduler's shift 3.

  python sample.py --checkpoint ckpt/sd3-medium --cond cond.npz --preset sd3_medium:diffusers --out grid.png
"""
from dit_jax.presets import make_preset

FLAVOURS = {
    "reference": dict(method="dpmpp_2m_sd35", steps=50, shift=1.0, cfg_scale=5.0, skip_layer_guidance=None),
    "diffusers": dict(method="euler", steps=28, shift=3.0, cfg_scale=7.0, skip_layer_guidance=None),
}


def get_config(flavour: str = "reference"):
  return make_preset(FLAVOURS, flavour)
