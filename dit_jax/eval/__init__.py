"""Evaluation: the FID Inception-v3 with the TF1 graph's own preprocessing (:mod:`dit_jax.eval.inception`).

    model = dit_jax.load("inception/")       # converted by tools/convert_torch.py from pytorch-fid / torch-fidelity
    out = model(images)                      # uint8 (B, H, W, 3) -> {'pool3', 'spatial', 'logits'}
"""
from dit_jax.eval.inception import InceptionConfig, InceptionV3, preprocess, tf1_resize, tf1_resize_matrix

__all__ = ["InceptionConfig", "InceptionV3", "preprocess", "tf1_resize", "tf1_resize_matrix"]
