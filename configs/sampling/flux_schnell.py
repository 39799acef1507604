"""FLUX.1 [schnell] sampling preset: 4 flow-match Euler steps on the unshifted FLUX schedule [1, .75, .5, .25, 0],
no guidance input (timestep-distilled) and no CFG.

'reference': BFL flux ``cli.py`` for flux-schnell (4 steps; ``get_schedule(shift=False)``).
'diffusers': the model card's FluxPipeline call (num_inference_steps=4, guidance_scale=0.0, max_sequence_length=256;
the schnell scheduler does not shift).
"""
from dit_jax.presets import make_preset

FLAVOURS = {
    "reference": dict(method="euler", steps=4, shift=None, cfg_scale=1.0, skip_layer_guidance=None, guidance=None,
                      schedule="reference"),
    "diffusers": dict(method="euler", steps=4, shift=None, cfg_scale=1.0, skip_layer_guidance=None, guidance=None,
                      schedule="diffusers"),
}


def get_config(flavour: str = "reference"):
  return make_preset(FLAVOURS, flavour)
