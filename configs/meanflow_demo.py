"""MeanFlow distillation of the digits demo (configs/demo.py): the student, initialised from the teacher with a
zero interval input, learns the average velocity of the teacher's CFG-2 flow, then samples in one or two steps.

  bash demo.sh runs/demo                                    # the teacher (rectified-flow DiT)
  python train.py --config configs/meanflow_demo.py --workdir runs/demo-meanflow --config.teacher.checkpoint=runs/demo
  python tools/demo_quality.py runs/demo-meanflow --method meanflow --steps 1 --cfg-scale 1
"""
from configs import demo


def get_config():
  c = demo.get_config()
  c.objective = "meanflow"
  c.model.interval_embed = True
  c.teacher.checkpoint = "runs/demo"
  c.distill.meanflow.update(velocity="teacher", guidance=2.0)
  c.total_steps = 400
  c.optimizer.update(lr=5e-4, warmup_steps=50, schedule="cosine", min_lr=1e-5)
  c.checkpoint_every_steps = 500
  c.sample_every_steps = 0
  c.ema_decay = 0.99  # a short fine-tune: the demo's 0.999 would still hold a third of the teacher after 1000 steps
  c.sample.update(method="meanflow", steps=1, cfg_scale=1.0)
  return c
