"""What dit_jax knows about one model kind: its module and config, how the trainer and the sampler call it, its
FLOPs, its converter tables. A kind is a :class:`Kind` instance in :data:`dit_jax.kinds.KINDS`; the trainer,
the sampler, ``dit_jax.load``, ``sample.py`` and the converter ask it instead of branching on the kind.
"""
from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any, Callable, ClassVar

import jax
import ml_collections
import numpy as np
from flax import nnx

from dit_jax.diffusion import guidance

NetFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x (B, H, W, C), model time (B,)) -> (B, H, W, C_out)


@dataclasses.dataclass(frozen=True)
class SampleSpec:
  """A checked sampling request: host arrays for both CFG branches and the resolved defaults."""

  cond: Any  # (B,) int32 labels or a mapping of float32 arrays
  uncond: Any  # the unconditional branch, same structure and batch as cond
  latent_shape: tuple[int, int, int, int]  # (B, H, W, C)
  method: str
  shift: float
  flow_convention: str
  slg: guidance.SkipLayerGuidance | None = None
  schedule: Callable[[int], np.ndarray] | None = None  # steps -> (steps + 1,) sigmas (None: the method's default)


def check_guidance(cfg, guidance) -> float:
  """The guidance input of a guidance-distilled DiT / MMDiT: required there (the CFG scale it reproduces), refused
  elsewhere; one-line errors."""
  if not cfg.guidance_embed:
    raise ValueError("guidance is the input of a guidance-distilled model (guidance_embed); this one is guided "
                     "with cfg_scale")
  if guidance is None:
    raise ValueError("this model is guidance-distilled: pass guidance=g (the CFG scale it reproduces, one model "
                     "call per step)")
  if not np.isfinite(guidance) or guidance < 0:
    raise ValueError(f"guidance must be a finite number >= 0, got {guidance}")
  return float(guidance)


class Kind:
  """One model kind. Subclasses set the class attributes and override what the kind supports; the defaults
  say in one line that the kind cannot do it."""

  name: ClassVar[str]
  module: ClassVar[type[nnx.Module]]  # module(config, *, rngs, dtype, param_dtype, attention_impl, ...)
  config: ClassVar[type]  # a JsonConfig dataclass: to_dict() / from_dict()
  tables: ClassVar[ModuleType | None] = None  # dit_jax.convert.<family>_tables (LAYOUTS, detect_layout, ...)
  conditioning: ClassVar[str | None] = None  # what sampling takes: "labels" | "text" | None (not sampled)
  batch_ndims: ClassVar[dict[str, int]] = {}  # training batch key -> ndim ({} = not trained)
  train_section: ClassVar[str | None] = None  # a training-config section of its own (e.g. "mmdit"), if any
  resolution_shift: ClassVar[bool] = False  # sampling takes shift="resolution" (the latent size's own shift)
  distillable: ClassVar[bool] = False  # a student of dit_jax.distill's objectives (guidance / interval inputs)

  def build(self, config, *, rngs: nnx.Rngs, dtype, param_dtype, attention_impl: str = "auto",
            remat: str = "none", scan_layers: bool = False) -> nnx.Module:
    """The module for ``config`` (remat / scan_layers: training-time options of trainable kinds)."""
    return self.module(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                       remat=remat, scan_layers=scan_layers)

  def stack_blocks(self, config, state: nnx.State) -> nnx.State:
    """A per-block (canonical) state -> the layout of the ``scan_layers`` module (runs of blocks stacked)."""
    self._cannot("scan layers")

  def unstack_blocks(self, config, state: nnx.State) -> nnx.State:
    """Inverse of :meth:`stack_blocks`: a ``scan_layers`` module's state in the canonical per-block layout."""
    self._cannot("scan layers")

  def describe(self, config) -> str:
    """One line for the converter's summary."""
    return f"{self.name} {config}"

  def _cannot(self, what: str):
    raise ValueError(f"model kind {self.name!r} cannot {what}")

  # Training ----------------------------------------------------------------------------------------------------

  def train_defaults(self) -> ml_collections.ConfigDict | None:
    """The defaults of :attr:`train_section` (added to the training-config schema)."""
    return None

  def model_config(self, config: ml_collections.ConfigDict):
    """The model config a training config describes."""
    self._cannot("be trained")

  def train_checks(self, config: ml_collections.ConfigDict) -> list[tuple[bool, str]]:
    """(ok, message) pairs for a training config of this kind (beyond the model config's own checks)."""
    return []

  def network(self, config: ml_collections.ConfigDict, model: nnx.Module, batch: dict[str, jax.Array],
              dropout_key: jax.Array | None, *, uncond: bool = False, **inputs) -> NetFn:
    """How the training loss calls the model on one batch: conditioning dropout drawn from ``dropout_key`` (None:
    no dropout), or ``uncond`` (the unconditional branch of classifier-free guidance); ``inputs`` are the model's
    optional scalar inputs (``guidance``, ``interval``)."""
    self._cannot("be trained")

  def flops(self, config, batch: dict[str, np.ndarray]) -> float:
    """Forward FLOPs per example of this batch's shapes."""
    self._cannot("report FLOPs")

  def example_batch(self, config: ml_collections.ConfigDict, batch_size: int,
                    context_length: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a training batch of ``batch_size`` (for ahead-of-time compiles)."""
    self._cannot("be trained")

  def loader_kwargs(self, config: ml_collections.ConfigDict) -> dict[str, int]:
    """Extra keyword arguments for ``dit_jax.data.make_loader``."""
    return {}

  def conditioning_meta(self, config: ml_collections.ConfigDict, loader=None) -> dict | None:
    """How a training run is conditioned, recorded in the workdir's metadata (None: nothing to record)."""
    return None

  def grid_cond(self, config: ml_collections.ConfigDict, model: nnx.Module, num: int, start: int = 0):
    """What the training loop's sample grid (and, from ``start`` on, its evaluation batches) is conditioned on:
    ``num`` rows of a fixed sequence."""
    self._cannot("be sampled")

  # Distillation (LADD) ------------------------------------------------------------------------------------------

  def token_features(self, model: nnx.Module, batch: dict, x: jax.Array, t: jax.Array,
                     blocks: tuple[int, ...]) -> list[jax.Array]:
    """The image-token outputs (B, T, D) of ``blocks`` for x at model time t, conditioned as ``batch``."""
    self._cannot("give token features (LADD)")

  def discriminator_condition(self, model_config) -> dict:
    """How LADD's discriminator heads are conditioned: dict(num_classes=...) or dict(cond_dim=...)."""
    self._cannot("be distilled with LADD")

  def discriminator_input(self, batch: dict) -> jax.Array:
    """The batch's condition for the discriminator heads: (B,) labels or (B, P) pooled vectors."""
    self._cannot("be distilled with LADD")

  def guidance_kwargs(self, config: ml_collections.ConfigDict, cfg_scale: float) -> dict:
    """How the training loop's grids and evaluations guide at ``cfg_scale``: CFG, or, for a guidance-distilled
    student (``guidance_embed`` in its section), the same scale as its guidance input with one call per step."""
    section = config[self.train_section] if self.train_section else config.model
    if section.get("guidance_embed", False):
      return {"cfg_scale": 1.0, "guidance": cfg_scale}
    return {"cfg_scale": cfg_scale}

  def grid_sample_kwargs(self, config: ml_collections.ConfigDict) -> dict:
    """``dit_jax.sample`` options of the training loop's sample grid beyond ``config.sample`` (default: the
    training flow shift)."""
    return {"shift": config.flow.shift}

  # Sampling ----------------------------------------------------------------------------------------------------

  def prepare_sample(self, model_config, cond, *, method: str | None, shift: float | None,
                     flow_convention: str | None, negative=None, skip_layer_guidance=None,
                     latent_size=None, guidance=None, schedule=None) -> SampleSpec:
    """Check a ``dit_jax.sample`` request against the model and fill in the kind's defaults (``guidance`` and
    ``schedule``, FLUX's, are passed only when set)."""
    self._cannot("be sampled")

  def check_latent_size(self, model_config, latent_size) -> tuple[int, int]:
    """(h, w) latent pixels a sample of this model may have (``latent_size`` None: the default)."""
    self._cannot("take a latent size")

  def sample_network(self, model: nnx.Module, skip_layers: tuple[int, ...] = (), **inputs):
    """``f(x, t, cond)`` for the sampler (``skip_layers``: blocks left out, for skip-layer guidance; ``inputs``:
    the model's scalar inputs of this step, e.g. a MeanFlow model's ``interval``)."""
    self._cannot("be sampled")
