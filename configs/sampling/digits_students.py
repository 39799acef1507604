"""Sampling presets of the digits few-step demos (README table): the teacher (configs/demo.py) and its students
(configs/distill_guidance_demo.py, meanflow_demo.py, ladd_demo.py), as tools/distill_demo.py samples them.

'teacher': 32 Euler steps with CFG 2; 'guidance': 32 Euler steps, one call each, guidance input 2; 'meanflow' /
'meanflow_2': 1 / 2 MeanFlow steps; 'ladd' / 'ladd_1': LADD's sampler at 4 / 1 steps. No CFG for the students.
"""
from dit_jax.presets import make_preset

_PLAIN = dict(shift=None, skip_layer_guidance=None)
FLAVOURS = {
    "teacher": dict(method="euler", steps=32, cfg_scale=2.0, **_PLAIN),
    "guidance": dict(method="euler", steps=32, cfg_scale=1.0, guidance=2.0, **_PLAIN),
    "meanflow": dict(method="meanflow", steps=1, cfg_scale=1.0, **_PLAIN),
    "meanflow_2": dict(method="meanflow", steps=2, cfg_scale=1.0, **_PLAIN),
    "ladd": dict(method="few_step", steps=4, cfg_scale=1.0, **_PLAIN),
    "ladd_1": dict(method="few_step", steps=1, cfg_scale=1.0, **_PLAIN),
}


def get_config(flavour: str = "teacher"):
  return make_preset(FLAVOURS, flavour)
