"""Reference T5 v1.1 encoders: transformers ``T5EncoderModel`` with seeded random weights (eager attention, no
dropout), its forward on numpy token ids, and the tiny / real-width configs the tests use."""
from __future__ import annotations

import numpy as np
import torch

# Tiny T5 v1.1 encoders. SHORT has few buckets and a short max distance so sequences of ~20 tokens reach the capped
# last bucket of both directions, and values that only config.json records (max distance, eps).
T5_TINY = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4)
T5_SHORT = dict(T5_TINY, relative_attention_num_buckets=8, relative_attention_max_distance=10,
                layer_norm_epsilon=1e-5)
T5_VARIANTS = {"tiny": T5_TINY, "short": T5_SHORT}
# T5-XXL's real width (d_model 4096, 64 heads of 64, d_ff 10240) with 2 layers and a small vocabulary.
T5_WIDE = dict(vocab_size=128, d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64)

PAD, EOS = 0, 1


def randomize_t5_(model: torch.nn.Module, seed: int = 0) -> None:
  """Realistic random weights: token embedding N(0, 1); q N(0, 1/(d_model*d_kv)) (T5 folds the 1/sqrt(d_kv)
  score scale into q's init); other matrices N(0, 1/fan_in); norm weights 1 + N(0, 0.1^2); bias table N(0, 1)."""
  gen = torch.Generator().manual_seed(seed)
  d_kv = model.config.d_kv
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      if "relative_attention_bias" in name or name == "shared.weight":
        std = 1.0
      elif p.ndim > 1:
        std = (p.shape[-1] * (d_kv if name.endswith("SelfAttention.q.weight") else 1)) ** -0.5
      else:
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        continue
      p.copy_(torch.randn(p.shape, generator=gen) * std)


def hf_t5(config: dict, seed: int = 0):
  """A transformers T5EncoderModel (gated-gelu, eager attention, dropout 0) with seeded random weights, eval."""
  from transformers import T5Config, T5EncoderModel

  cfg = T5Config(**config, feed_forward_proj="gated-gelu", dropout_rate=0.0, attn_implementation="eager")
  with torch.device("meta"):  # no default init: randomize_t5_ fills every parameter
    model = T5EncoderModel(cfg)
  model.to_empty(device="cpu")
  model.set_input_embeddings(model.shared)  # to_empty unties encoder.embed_tokens from shared
  assert not list(model.buffers())
  randomize_t5_(model, seed)
  return model.eval()


def hf_t5_forward(model, ids: np.ndarray, mask: np.ndarray | None = None, hidden_states: bool = False):
  """last_hidden_state (B, L, D) as numpy (``hidden_states``: also the per-layer states, embeddings first)."""
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask),
                output_hidden_states=hidden_states)
  last = out.last_hidden_state.float().numpy()
  return (last, [h.float().numpy() for h in out.hidden_states]) if hidden_states else last


def t5_ids(batch: int, length: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Token ids shaped like a padded T5 tokenizer's output (words, EOS, then PAD; row i has fewer words) and the
  matching attention mask (1 = token, 0 = pad): (B, L) int64 each."""
  rng = np.random.default_rng(seed)
  ids = np.full((batch, length), PAD, np.int64)
  mask = np.zeros((batch, length), np.int64)
  for i in range(batch):
    n = max(1, length - 1 - 5 * i)
    ids[i, :n] = rng.integers(2, vocab, n)
    ids[i, n] = EOS
    mask[i, :n + 1] = 1
  return ids, mask


def t5_state_dict(model) -> dict[str, np.ndarray]:
  """The model's state dict as numpy (both tied copies of the embedding: shared and encoder.embed_tokens)."""
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
