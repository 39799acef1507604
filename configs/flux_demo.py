"""Embedded FLUX demo: a small FLUX.1-shaped transformer (double- then single-stream blocks, rotary positions, QK
RMSNorm) learns scikit-learn's 8x8 digits with rectified flow in the FLUX convention (model time = sigma,
logit-normal noise levels) on a CPU in a few minutes (600 steps). As in configs/mmdit_demo.py the model never sees
labels: each digit class is a fixed, seeded set of context tokens and a pooled vector, standing in for T5 / CLIP.
The 8x8x1 digits pack 2x2 into 16 tokens of 4 channels (in_channels 4). Schnell-like (no guidance embedder), so
sampling uses plain CFG against the zero condition of the training dropout.

  python train.py --config configs/flux_demo.py --workdir runs/flux-demo
  python tools/demo_quality.py runs/flux-demo --per-class 50 --target 0.90
"""
from dit_jax.train_config import default_config


def get_config():
  c = default_config()
  c.seed = 0
  c.total_steps = 600
  c.global_batch_size = 128
  c.model.kind = "flux"
  c.flux.update(in_channels=4, out_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=32,
                num_attention_heads=3, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
                axes_dims_rope=(8, 12, 12), sample_size=8)
  c.cond_dropout_prob = 0.1
  c.objective = "flow"
  # 16 tokens: FLUX's resolution shift would be e^0.46 = 1.6; the digits train and sample unshifted, as the MMDiT demo
  c.flow.update(t_sampler="logit_normal", loc=0.0, scale=1.0, shift=1.0, convention="flux")
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
