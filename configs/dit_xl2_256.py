"""The DiT paper's recipe: DiT-XL/2 on ImageNet 256x256 latents, IDDPM hybrid loss, AdamW 1e-4, batch 256, EMA 0.9999.

  python tools/encode_latents.py --vae /ckpt/sd-vae-ft-ema --out /data/in256-latents --image-size 256 \
      --data.source tfds --data.name imagenet2012 --data.manual_dir /data/imagenet   # once
  python train.py --config configs/dit_xl2_256.py --workdir runs/dit-xl2 --config.data.folder=/data/in256-latents
"""
from dit_jax.train_config import default_config


def get_config():
  c = default_config()
  c.total_steps = 400_000
  c.global_batch_size = 256
  c.model.update(name="DiT-XL/2", input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
  c.objective = "vp"
  c.optimizer.update(lr=1e-4, weight_decay=0.0, schedule="constant", warmup_steps=0, grad_clip=0.0)
  c.ema_decay = 0.9999
  c.compute_dtype = "bfloat16"
  c.mesh_shape = (-1, 1, 1)
  # ImageNet 256 as pre-encoded VAE posteriors: a fresh flip and posterior sample per use (data/latents.py).
  c.data.update(source="latents", folder="", image_size=256, random_flip=True)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 5000
  c.sample_every_steps = 0
  c.sample.update(method="ddpm", steps=250, cfg_scale=4.0, num=16)
  return c
