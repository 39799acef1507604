"""SiT-XL/2: the DiT-XL/2 backbone trained with rectified flow (Linear path, velocity, uniform t; SiT's time
convention), ImageNet 256x256 latents.

  python train.py --config configs/sit_xl2_256.py --workdir runs/sit-xl2 --config.data.manual_dir=/data/imagenet
"""
from dit_jax.train_config import default_config


def get_config():
  c = default_config()
  c.total_steps = 400_000
  c.global_batch_size = 256
  c.model.update(name="DiT-XL/2", input_size=32, in_channels=4, num_classes=1000, learn_sigma=False)
  c.objective = "flow"
  c.flow.update(t_sampler="uniform", convention="sit", shift=1.0)
  c.optimizer.update(lr=1e-4, weight_decay=0.0, schedule="constant")
  c.ema_decay = 0.9999
  c.compute_dtype = "bfloat16"
  c.data.update(source="tfds", name="imagenet2012", split="train", image_size=256, random_flip=True)
  c.sample.update(method="sde", steps=250, cfg_scale=1.5, num=16)
  return c
