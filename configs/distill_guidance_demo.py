"""Guidance distillation of the digits demo (configs/demo.py): the student, initialised from the teacher with a
zero guidance input, learns the teacher's CFG output for g ~ U[1, 3], then samples with one model call per step.

  bash demo.sh runs/demo                                    # the teacher (rectified-flow DiT)
  python train.py --config configs/distill_guidance_demo.py --workdir runs/demo-guidance \
      --config.teacher.checkpoint=runs/demo
  python tools/demo_quality.py runs/demo-guidance --guidance 2.0 --cfg-scale 1
"""
from configs import demo


def get_config():
  c = demo.get_config()
  c.objective = "guidance_distill"
  c.model.guidance_embed = True
  c.teacher.checkpoint = "runs/demo"
  c.distill.guidance_range = (1.0, 3.0)
  c.total_steps = 400
  c.optimizer.update(lr=3e-4, warmup_steps=50, schedule="cosine", min_lr=1e-5)
  c.checkpoint_every_steps = 300
  c.sample_every_steps = 0
  c.ema_decay = 0.99  # a short fine-tune: the demo's 0.999 would still hold a third of the teacher after 1000 steps
  c.sample.update(cfg_scale=2.0)  # grids (when enabled) use it as the student's guidance input
  return c
