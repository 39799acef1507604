"""FLUX.1 [dev] sampling preset: flow-match Euler on the FLUX schedule, shifted by the resolution's mu, with the
distilled guidance input 3.5 and no true CFG.

'reference': BFL flux ``cli.py`` for flux-dev (50 steps, ``get_schedule`` with shift; guidance 3.5 as released and
as ``demo_gr.py`` still uses; HEAD's cli.py defaults to 2.5 since the Kontext release, for its Krea-dev default).
'diffusers': FluxPipeline's defaults (28 steps, guidance_scale 3.5, true_cfg_scale 1).
Resolution is not part of a preset: BFL's CLI defaults to 1360x768 (latent 96x170), diffusers to 1024x1024 (128x128).
"""
from dit_jax.presets import make_preset

FLAVOURS = {
    "reference": dict(method="euler", steps=50, shift=None, cfg_scale=1.0, skip_layer_guidance=None, guidance=3.5,
                      schedule="reference"),
    "diffusers": dict(method="euler", steps=28, shift=None, cfg_scale=1.0, skip_layer_guidance=None, guidance=3.5,
                      schedule="diffusers"),
}


def get_config(flavour: str = "reference"):
  return make_preset(FLAVOURS, flavour)
