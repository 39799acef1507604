"""Few-step distillation: training objectives that learn from a frozen teacher (:mod:`dit_jax.distill.teacher`)
and their auxiliary networks (LADD discriminator heads).

  guidance_distill  a student with a guidance input regresses the teacher's CFG output (:mod:`.guidance`)

Each objective is ``loss(config, kind, student, teacher, batch, key) -> scalar``; :data:`OBJECTIVES` names them
for ``config.objective``.
"""
from dit_jax.distill.guidance import guidance_distillation_loss

OBJECTIVES = {"guidance_distill": guidance_distillation_loss}
