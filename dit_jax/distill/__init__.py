"""Few-step distillation: training objectives that learn from a frozen teacher (:mod:`dit_jax.distill.teacher`)
and their auxiliary networks (LADD discriminator heads).

  guidance_distill  a student with a guidance input regresses the teacher's CFG output (:mod:`.guidance`)
  meanflow          a student with an interval input learns the average velocity, 1-2 step sampling
                    (:mod:`.meanflow`; from data or from the teacher's CFG velocity)

Each objective is ``loss(config, kind, student, teacher, batch, key) -> scalar``; :data:`OBJECTIVES` names them
for ``config.objective``.
"""
from dit_jax.distill.guidance import guidance_distillation_loss
from dit_jax.distill.meanflow import meanflow_distillation_loss

OBJECTIVES = {"guidance_distill": guidance_distillation_loss, "meanflow": meanflow_distillation_loss}
NEEDS_TEACHER = {"guidance_distill": lambda config: True,
                 "meanflow": lambda config: config.distill.meanflow.velocity == "teacher"}
