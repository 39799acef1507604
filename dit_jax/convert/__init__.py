"""Import PyTorch DiT / MMDiT / VAE checkpoints (original, Stability or diffusers layouts) and export them back.

* :mod:`~dit_jax.convert.readers`: safe readers for ``.pt`` / safetensors / diffusers folders -> numpy.
* :mod:`~dit_jax.convert.engine`: declarative key tables (:class:`Rule`) applied strictly, and their inverse.
* :mod:`~dit_jax.convert.dit_tables`, :mod:`~dit_jax.convert.mmdit_tables`, :mod:`~dit_jax.convert.vae_tables`:
  one module per model family, each with ``LAYOUTS``, ``detect_layout``, ``infer_config``, ``to_model`` and
  ``from_model``.
* :mod:`~dit_jax.convert.files`: ``convert(src, out_dir)`` / ``export(ckpt_dir, out_file, layout=...)`` between
  PyTorch files / folders and dit_jax checkpoint directories.

This package module stays light (no tables, no :mod:`dit_jax.checkpoint`), so that importing a tables module
never imports the checkpoint code.
"""
from __future__ import annotations

from dit_jax.convert.engine import Rule
from dit_jax.convert.readers import ConversionError, Source, read_source

__all__ = ["ConversionError", "Rule", "Source", "read_source"]
