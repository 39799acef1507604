"""Few-step distillation: training objectives that learn from a frozen teacher (:mod:`dit_jax.distill.teacher`)
and their auxiliary networks (LADD discriminator heads).

  guidance_distill  a student with a guidance input regresses the teacher's CFG output (:mod:`.guidance`)
  meanflow          a student with an interval input learns the average velocity, 1-2 step sampling
                    (:mod:`.meanflow`; from data or from the teacher's CFG velocity)
  ladd              adversarial: a discriminator on the teacher's token features judges the student's renoised
                    one-step estimates, 1-4 step sampling (:mod:`.ladd_objective`, heads in :mod:`.ladd`)

Each objective is ``loss(config, kind, student, teacher, batch, key) -> scalar``; :data:`OBJECTIVES` names them
for ``config.objective``. An objective in :data:`AUXILIARY` also trains a second network with its own optimizer
(LADD's discriminator): the Trainer takes both gradients from its ``grads`` and keeps that network's parameters
and optimizer state in the TrainState. Any objective may train on the teacher's own samples instead of the
configured data (:mod:`.teacher_data`, LADD's setting), written once before the first step.
"""
from dit_jax.distill.guidance import guidance_distillation_loss
from dit_jax.distill.ladd_objective import LADD, ladd_loss
from dit_jax.distill.meanflow import meanflow_distillation_loss

OBJECTIVES = {"guidance_distill": guidance_distillation_loss, "meanflow": meanflow_distillation_loss,
              "ladd": ladd_loss}
NEEDS_TEACHER = {"guidance_distill": lambda config: True,
                 "meanflow": lambda config: config.distill.meanflow.velocity == "teacher",
                 "ladd": lambda config: True}
AUXILIARY = {"ladd": LADD}
