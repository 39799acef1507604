"""Embedded MMDiT demo: a small pixel-space MMDiT learns scikit-learn's 8x8 digits with rectified flow (SD3
convention, logit-normal noise levels) on a CPU in about a minute (600 steps). The model never sees labels: each
digit class is a fixed, seeded set of context tokens and a pooled vector, standing in for a text encoder's output.

  python train.py --config configs/mmdit_demo.py --workdir runs/mmdit-demo
  python tools/demo_quality.py runs/mmdit-demo --per-class 50
"""
from dit_jax.train_config import default_config


def get_config():
  c = default_config()
  c.seed = 0
  c.total_steps = 600
  c.global_batch_size = 128
  c.model.kind = "mmdit"
  c.mmdit.update(sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_layers=3, attention_head_dim=32,
                 num_attention_heads=3, joint_attention_dim=32, caption_projection_dim=96, pooled_projection_dim=32,
                 pos_embed_max_size=4, qk_norm="rms_norm", dual_attention_layers=())
  c.cond_dropout_prob = 0.1
  c.objective = "flow"
  c.flow.update(t_sampler="logit_normal", loc=0.0, scale=1.0, shift=1.0, convention="sd3")
  c.optimizer.update(lr=1e-3, warmup_steps=50, schedule="cosine", min_lr=1e-5, weight_decay=0.0, grad_clip=1.0)
  c.ema_decay = 0.995  # a short run: 0.999 would still hold ~55% of the initial weights at step 600
  c.data.update(source="digits", image_size=8, random_flip=False, conditioning="class_tokens", class_token_length=4,
                class_token_seed=0)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 300
  c.keep_checkpoints = 2
  c.keep_period = 0
  c.sample_every_steps = 600  # one grid of digits 0-9 (twice) at the end, in <workdir>/samples/
  c.sample.update(method="euler", steps=32, cfg_scale=2.0, num=20)
  return c
