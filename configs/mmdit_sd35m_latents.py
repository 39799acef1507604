"""Recipe: an SD3.5-Medium-shaped MMDiT-X (24 layers, hidden 1536, QK RMSNorm, dual attention in layers 0-12;
about 2.5 B parameters) trained from scratch with rectified flow on 16-channel VAE latent shards and precomputed
text-embedding shards (context 4096-d tokens, pooled 2048-d, as SD3's CLIP-L/G + T5 give), bf16 compute, FSDP.

  python tools/encode_latents.py --vae ckpt/sd35-vae --out /data/latents-256 --image-size 256 ...   # once
  # text: data.write_text_embedding_shards("/data/text-256", context (N, L, 4096), pooled (N, 2048)), row i = item i
  python train.py --config configs/mmdit_sd35m_latents.py --workdir runs/mmdit-sd35m \
      --config.data.folder=/data/latents-256 --config.data.text_folder=/data/text-256

Noise levels as in the SD3 paper (Esser et al. 2024): logit-normal(0, 1), shifted by 3.0 (its choice for 1024 px;
use 1.0 for a 256 px pre-training stage). Each example's context and pooled are dropped to zeros with
probability 0.1 so that classifier-free guidance with zero negatives works (the paper drops each of its three
text encoders separately; with precomputed joint embeddings one switch is what the data allow).
"""
from dit_jax.train_config import default_config


def get_config():
  c = default_config()
  c.total_steps = 500_000
  c.global_batch_size = 1024
  c.model.kind = "mmdit"
  c.mmdit.update(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                 num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                 pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
                 dual_attention_layers=tuple(range(13)))
  c.cond_dropout_prob = 0.1
  c.objective = "flow"
  c.flow.update(t_sampler="logit_normal", loc=0.0, scale=1.0, shift=3.0, convention="sd3")
  c.optimizer.update(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=1000, schedule="constant",
                     grad_clip=1.0)
  c.ema_decay = 0.9999
  c.compute_dtype = "bfloat16"
  c.remat = "full"  # recompute each joint block in the backward pass: activations of one block at a time
  c.scan_layers = True  # one compiled block per run of identical blocks (dual-attention 0-12, plain 13-22, last)
  c.attention_impl = "auto"
  c.mesh_shape = (1, -1, 1)  # FSDP over every device; e.g. (1, -1, 2) adds tensor parallelism over heads / MLP
  c.data.update(source="latents", folder="", random_flip=False, conditioning="text", text_folder="")
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.keep_period = 50_000
  c.sample_every_steps = 0
  c.sample.update(method="euler", steps=28, cfg_scale=5.0, num=16)
  return c
