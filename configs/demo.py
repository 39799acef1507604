"""Embedded demo: a small pixel-space DiT learns scikit-learn's 8x8 digits with rectified flow on a CPU.

  python train.py --config configs/demo.py --workdir runs/demo
"""
from dit_jax.train_config import default_config


def get_config():
  c = default_config()
  c.seed = 0
  c.total_steps = 2000
  c.global_batch_size = 128
  c.model.update(name="", input_size=8, in_channels=1, num_classes=10, learn_sigma=False, class_dropout_prob=0.1,
                 hidden_size=128, depth=4, num_heads=4, patch_size=2)
  c.objective = "flow"
  c.flow.update(t_sampler="logit_normal", loc=0.0, scale=1.0, convention="sit")
  c.optimizer.update(lr=1e-3, warmup_steps=100, schedule="cosine", min_lr=1e-5, weight_decay=0.0, grad_clip=1.0)
  c.ema_decay = 0.999
  c.data.update(source="digits", image_size=8, random_flip=False)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  c.keep_period = 0
  c.sample_every_steps = 1000
  c.sample.update(method="euler", steps=32, cfg_scale=2.0, num=20)
  return c
