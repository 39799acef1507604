"""Reference FID Inception-v3 networks with random weights: torch-fidelity's ``FeatureExtractorInceptionV3`` (with its
TF1 resize) and pytorch-fid's ``InceptionV3`` (FID variant), each written to / loaded from a state-dict file in the
port's own format. Nothing is downloaded: the ports' URL loaders are replaced by the local file.

Neither package is imported through its ``__init__``: torch-fidelity's imports torchvision (for CLIP / VGG / DINOv2),
which has no CPU build next to torch 2.13.0+cpu here. Only the modules the Inception needs are loaded, under a bare
package. pytorch-fid subclasses torchvision's Inception blocks, so it needs torchvision's Python sources: the
installed torchvision when it imports, else the pure-Python files of a torchvision wheel unpacked at
``$DIT_JAX_TORCHVISION_SRC`` (``pip install --no-deps --target DIR torchvision==0.28.0``), loaded without
torchvision's ``__init__`` (which loads its compiled ops).
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from unittest import mock

import numpy as np
import pytest
import torch

TORCHVISION_SRC = "DIT_JAX_TORCHVISION_SRC"


def _bare_package(name: str, path: str, **attrs) -> types.ModuleType:
  pkg = types.ModuleType(name)
  pkg.__path__ = [path]
  pkg.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
  pkg.__spec__.submodule_search_locations = [path]
  pkg.__dict__.update(attrs)
  sys.modules[name] = pkg
  return pkg


def torch_fidelity_modules():
  """(feature_extractor_inceptionv3, interpolate_compat_tensorflow) of torch-fidelity, or a pytest skip."""
  spec = importlib.util.find_spec("torch_fidelity")
  if spec is None:
    pytest.skip("torch-fidelity is not installed (pip install --no-deps torch-fidelity==0.4.0)")
  if "torch_fidelity" not in sys.modules:
    _bare_package("torch_fidelity", spec.submodule_search_locations[0])
  return (importlib.import_module("torch_fidelity.feature_extractor_inceptionv3"),
          importlib.import_module("torch_fidelity.interpolate_compat_tensorflow"))


def _torchvision_inception():
  """torchvision.models.inception from the installed torchvision, else from $DIT_JAX_TORCHVISION_SRC."""
  try:
    import torchvision.models.inception as inception
    return inception
  except Exception:  # noqa: BLE001 - absent, or a build that does not match this torch
    for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
      del sys.modules[name]
  src = os.environ.get(TORCHVISION_SRC)
  if not src or not os.path.isdir(os.path.join(src, "torchvision", "models")):
    pytest.skip(f"pytorch-fid needs torchvision: install a build matching torch {torch.__version__}, or unpack a "
                f"torchvision wheel's sources (pip install --no-deps --target DIR torchvision) and set "
                f"{TORCHVISION_SRC}=DIR")
  root = os.path.join(src, "torchvision")
  tv = _bare_package("torchvision", root, __version__="0.28.0")
  tv.models = _bare_package("torchvision.models", os.path.join(root, "models"))
  inception = importlib.import_module("torchvision.models.inception")
  tv.models.inception, tv.models.inception_v3 = inception, inception.inception_v3
  return inception


def pytorch_fid_module():
  """pytorch_fid.inception, or a pytest skip."""
  if importlib.util.find_spec("pytorch_fid") is None:
    pytest.skip("pytorch-fid is not installed (pip install --no-deps pytorch-fid==0.3.0)")
  _torchvision_inception()
  return importlib.import_module("pytorch_fid.inception")


def random_images(batch: int, height: int, width: int, seed: int) -> np.ndarray:
  """(B, H, W, 3) uint8: smooth colour ramps plus noise, so the resize sees structure at every scale."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
  ramps = np.stack([yy, xx, (yy + xx) / 2], -1)[None] * rng.uniform(100, 200, (batch, 1, 1, 3))
  return np.clip(ramps + rng.normal(0, 40, (batch, height, width, 3)), 0, 255).astype(np.uint8)


def randomize_(model: torch.nn.Module, run, seed: int) -> None:
  """Random weights with healthy activations: convs and fc ~ N(0, 2/fan_in), BatchNorm running statistics measured
  on random images (``run(model)`` in train mode), then every BN tensor perturbed (scale U(0.5, 1.5), bias N(0, 0.2),
  mean +N(0, 0.1)·std, var ·U(0.7, 1.4))."""
  g = torch.Generator().manual_seed(seed)
  bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim > 1:
        p.copy_(torch.randn(p.shape, generator=g) * (2 / p[0].numel()) ** 0.5)
      elif name.startswith("fc."):
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
    for bn in bns:
      bn.reset_running_stats()
      bn.momentum = None  # cumulative average over the calibration batch
    model.train()
    run(model)
    model.eval()
    for bn in bns:
      n = bn.num_features
      std = bn.running_var.sqrt()
      bn.weight.copy_(0.5 + torch.rand(n, generator=g))
      bn.bias.copy_(0.2 * torch.randn(n, generator=g))
      bn.running_mean.add_(0.1 * std * torch.randn(n, generator=g))
      bn.running_var.mul_(0.7 + 0.7 * torch.rand(n, generator=g))
      bn.momentum = 0.1


def torch_fidelity_file(path, seed: int = 0) -> dict[str, torch.Tensor]:
  """Write a random torch-fidelity Inception state dict to ``path`` (its own format: ``torch.save`` of the
  module's state_dict); returns it."""
  fe_mod, _ = torch_fidelity_modules()
  cls = fe_mod.FeatureExtractorInceptionV3
  with mock.patch.object(fe_mod, "load_state_dict_from_url", lambda *a, **k: None), \
       mock.patch.object(cls, "load_state_dict", lambda self, sd: None):
    model = cls("inception-v3-compat", ["2048"])
  images = torch.from_numpy(random_images(2, 299, 299, seed + 100)).permute(0, 3, 1, 2).contiguous()
  randomize_(model, lambda m: m(images), seed)
  state = model.state_dict()
  torch.save(state, path)
  return state


def torch_fidelity_extractor(path):
  """torch-fidelity's FeatureExtractorInceptionV3 loading ``path`` (strictly) with a hook that keeps
  Mixed_6d.branch1x1's output; call :func:`torch_fidelity_features`."""
  fe_mod, _ = torch_fidelity_modules()
  model = fe_mod.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                             feature_extractor_weights_path=str(path))
  model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: setattr(model, "mixed_6_conv", o))
  return model


def torch_fidelity_features(model, images: np.ndarray) -> dict[str, np.ndarray]:
  """uint8 (B, H, W, 3) -> {'pool3', 'spatial', 'logits'} from torch-fidelity (spatial: NHWC [..., :7] flattened)."""
  with torch.no_grad():
    pool3, logits = model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    spatial = model.mixed_6_conv.permute(0, 2, 3, 1)[..., :7].reshape(images.shape[0], -1)
  return {"pool3": pool3.numpy(), "spatial": spatial.numpy(), "logits": logits.numpy()}


def pytorch_fid_model(path):
  """pytorch-fid's InceptionV3 (FID Inception, pool3 block only, no resize, normalize_input=False) whose weights
  come from ``path`` through its own loader (``fid_inception_v3`` loads it strictly)."""
  pfi = pytorch_fid_module()
  with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: torch.load(path, weights_only=True)):
    model = pfi.InceptionV3([3], resize_input=False, normalize_input=False, use_fid_inception=True)
  return model.eval()


def pytorch_fid_file(path, seed: int = 1) -> dict[str, torch.Tensor]:
  """A random pytorch-fid ``pt_inception`` state dict (the names of ``fid_inception_v3()``) written to ``path``."""
  pfi = pytorch_fid_module()
  with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: None), \
       mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, sd, *a, **k: None):
    net = pfi.fid_inception_v3()
  images = torch.from_numpy(random_images(2, 160, 160, seed + 100)).float().permute(0, 3, 1, 2)  # smaller: faster
  randomize_(net, lambda m: m((images - 128) / 128), seed)
  state = net.state_dict()
  torch.save(state, path)
  return state


def random_inception(image_size: int = 299, seed: int = 0):
  """dit_jax's InceptionV3 with random weights directly (no torch): He-scaled convolutions and fc, identity batch
  norms. ``image_size`` 75 (the minimum) makes a cheap stand-in where only the pipeline around it is tested."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from dit_jax.eval.inception import InceptionConfig, InceptionV3

  config = InceptionConfig(image_size=image_size)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: InceptionV3(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def value(path, leaf):
    names = {str(getattr(p, "key", getattr(p, "name", p))) for p in path}
    if names & {"scale", "var"}:
      return jnp.ones(leaf.shape, leaf.dtype)
    if leaf.ndim < 2:
      return jnp.zeros(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) * np.sqrt(2.0 / fan_in))

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(value, state))


def frechet_by_eigh(a, b) -> float:
  """The Fréchet distance of two FeatureStats in float64, tr sqrt(S1 S2) from the eigenvalues of
  sqrt(S1) S2 sqrt(S1): an oracle independent of scipy's sqrtm (and of the float32 on-device forms)."""
  w, v = np.linalg.eigh(a.sigma)
  root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  eig = np.linalg.eigvalsh(root @ b.sigma @ root)
  diff = a.mu - b.mu
  return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())
