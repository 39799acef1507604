"""The training config schema: every key a config file or ``--config.key=value`` may set, with its default.

Config files in ``configs/`` start from :func:`default_config` and change values; :func:`validate` rejects keys
that are not in the schema, so a typo fails at once with a one-line error instead of being silently ignored.
"""
from __future__ import annotations

import ml_collections

from dit_jax import data, distill, kinds
from dit_jax.diffusion import flow
from dit_jax.diffusion.guidance import CFG_MODES
from dit_jax.diffusion.objectives import OBJECTIVES
from dit_jax.eval.loop import eval_checks
from dit_jax.models.config import check_all


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 400_000
  c.global_batch_size = 256
  c.grad_accum_steps = 1

  # Model: kind, a registered model kind (dit_jax.kinds): 'dit' (class-conditional DiT: a named config such as
  # 'DiT-XL/2' plus overrides, or name '' and every field below), 'mmdit' (SD3-style MMDiT: the fields of
  # c.mmdit, conditioned on context / pooled) or 'flux' (FLUX.1: c.flux). A kind with a section of its own adds it
  # below (Kind.train_section).
  c.model = ml_collections.ConfigDict(dict(
      kind="dit", name="DiT-XL/2", input_size=32, in_channels=4, num_classes=1000, learn_sigma=True,
      class_dropout_prob=0.1, hidden_size=0, depth=0, num_heads=0, patch_size=0, mlp_ratio=4.0,
      guidance_embed=False, interval_embed=False))
  for kind in kinds.KINDS.values():
    if kind.train_section:
      c[kind.train_section] = kind.train_defaults()
  c.cond_dropout_prob = 0.1  # MMDiT, FLUX: each example's context and pooled are zeroed with this probability
  c.compute_dtype = "float32"  # or 'bfloat16' (parameters stay float32)
  c.attention_impl = "auto"
  c.remat = "none"  # none | full | dots
  c.scan_layers = False

  # Objective: 'vp' (IDDPM hybrid loss, learn_sigma) or 'flow' (rectified flow, velocity MSE; MMDiT: flow with
  # convention 'sd3', i.e. x = (1 - s) x0 + s noise, target noise - x0, model time 1000 s).
  c.objective = "vp"
  # resolution_shift: shift the sampled sigmas by e^mu instead of flow.shift, mu linear in the latent's 2x2-patch
  # tokens N = H W / 4 from base_shift at 256 tokens to max_shift at 4096 (FLUX.1's dynamic shift, as its sampler).
  c.flow = ml_collections.ConfigDict(dict(t_sampler="uniform", loc=0.0, scale=1.0, mode_scale=1.29, shift=1.0,
                                          convention="sit", resolution_shift=False, base_shift=0.5, max_shift=1.15))

  # Distillation objectives (dit_jax.distill): the frozen teacher, a dit_jax checkpoint or training workdir of the
  # student's kind and shape (init_student: the student starts as the teacher); guidance_distill draws the
  # guidance scale of each example from guidance_range.
  # meanflow: (t, r) from the max / min of two logit-normal(loc, scale) draws, r = t for equal_fraction of the batch,
  # weight 1 / sg(err + c)^p; velocity 'data' (noise - x0) or 'teacher' (its CFG velocity at scale guidance).
  # ladd (dit_jax.distill.ladd_objective): student times `times` drawn with `probs` (warm-up: (0, 0, .5, .5)), the
  # renoising t̂ = sigmoid(renoise_loc + renoise_scale n); discriminator heads (head_channels, head_groups,
  # cmap_dim) on the teacher blocks `layers` (() = the middle and last), loss 'hinge' | 'softplus', approximate R1
  # (r1_weight, r1_sigma), its own Adam (d_lr constant, betas d_b1, d_b2; the student's grad_clip).
  # teacher_data (dit_jax.distill.teacher_data; any distillation objective, LADD's data): num_samples > 0 trains on
  # that many teacher samples instead of config.data, generated once before the first step into dir ("" =
  # <workdir>/teacher_samples; resumed if unfinished, reused if complete, refused if another teacher's) in shards
  # of shard_size, batch_size per sampler call (0 = global_batch_size); sample: method (a flow sampler), steps,
  # cfg_scale, cfg_mode, shift (0 = flow.shift); labels cycled class-balanced (DiT, class tokens) or text row i;
  # random_flip: flip the samples in training.
  c.teacher = ml_collections.ConfigDict(dict(checkpoint="", init_student=True))
  c.distill = ml_collections.ConfigDict(dict(
      guidance_range=(1.0, 4.0),
      meanflow=ml_collections.ConfigDict(dict(t_sampler="logit_normal", loc=-0.4, scale=1.0, equal_fraction=0.75,
                                              p=1.0, c=0.01, velocity="data", guidance=1.0)),
      ladd=ml_collections.ConfigDict(dict(times=(1.0, 0.75, 0.5, 0.25), probs=(0.7, 0.1, 0.1, 0.1),
                                          renoise_loc=1.0, renoise_scale=1.0, layers=(), loss="hinge",
                                          r1_weight=1.0, r1_sigma=0.1, d_lr=1e-4, d_b1=0.0, d_b2=0.99,
                                          head_channels=256, head_groups=32, cmap_dim=64)),
      teacher_data=ml_collections.ConfigDict(dict(
          num_samples=0, dir="", shard_size=1024, batch_size=0, random_flip=False,
          sample=ml_collections.ConfigDict(dict(method="euler", steps=32, cfg_scale=4.0, cfg_mode="all",
                                                shift=0.0))))))

  c.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0, schedule="constant", min_lr=0.0,
      grad_clip=0.0))
  c.ema_decay = 0.9999

  # Parallelism: mesh (data, fsdp, tensor); -1 fills the rest. Multi-host: coordinator_address set, or auto.
  c.mesh_shape = (-1, 1, 1)
  c.distributed = ml_collections.ConfigDict(dict(initialize=False, coordinator_address="", num_processes=0,
                                                 process_id=-1))

  # Data (see dit_jax.data).
  c.data = data.default_data_config()

  # Bookkeeping.
  c.log_every_steps = 100
  c.checkpoint_every_steps = 5000
  c.keep_checkpoints = 3  # the last N ...
  c.keep_period = 50_000  # ... plus every K-th step (0 = none)
  c.nonfinite_abort_after = 20  # consecutive skipped (non-finite) updates before aborting
  c.sample_every_steps = 0  # 0 = never; else a grid of EMA samples as an image summary
  c.sample = ml_collections.ConfigDict(dict(method="ddpm", steps=50, cfg_scale=4.0, cfg_mode="all", num=16))
  # FID / IS of num_samples EMA samples every eval_every_steps (0 = never; dit_jax.eval.loop), against an ADM
  # reference batch (.npz: mu / sigma, else its images' statistics), features from a converted FID Inception
  # (default $DIT_JAX_INCEPTION); latent data is decoded by eval.vae. batch_size 0 = global_batch_size.
  c.eval_every_steps = 0
  c.eval = ml_collections.ConfigDict(dict(
      num_samples=10_000, batch_size=0, reference="", inception="", vae="",
      sample=ml_collections.ConfigDict(dict(method="ddpm", steps=250, cfg_scale=1.5, cfg_mode="all"))))
  return c


def _check_keys(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str = "") -> None:
  for key, value in config.items():
    path = f"{prefix}{key}"
    if key not in schema:
      raise ValueError(f"unknown config key {path!r}")
    if isinstance(value, ml_collections.ConfigDict) and isinstance(schema[key], ml_collections.ConfigDict):
      _check_keys(value, schema[key], path + ".")


def distill_checks(config: ml_collections.ConfigDict, kind) -> list[tuple[bool, str]]:
  """(ok, message) pairs for the distillation objectives."""
  if config.objective not in distill.OBJECTIVES:
    return [(not config.distill.teacher_data.num_samples, "distill.teacher_data samples a teacher: it needs a "
             f"distillation objective, not {config.objective!r}")]
  section = config[kind.train_section] if kind.train_section else config.model
  lo, hi = (tuple(config.distill.guidance_range) + (None, None))[:2]
  m = config.distill.meanflow
  checks = [(kind.distillable, f"model.kind {kind.name!r} cannot be distilled (a DiT or an MMDiT student)"),
            (bool(config.teacher.checkpoint) or not distill.NEEDS_TEACHER[config.objective](config),
             f"objective {config.objective!r} needs teacher.checkpoint")]
  if config.objective == "meanflow":
    checks += [(bool(section.get("interval_embed")), "objective 'meanflow' needs a student with an interval input: "
                f"set {kind.train_section or 'model'}.interval_embed=True"),
               (m.velocity in ("data", "teacher"), f"distill.meanflow.velocity {m.velocity!r} is not 'data' or "
                                                   "'teacher'"),
               (0 <= m.equal_fraction <= 1 and m.c > 0 and m.p >= 0 and m.guidance >= 0,
                "distill.meanflow needs 0 <= equal_fraction <= 1, c > 0, p >= 0, guidance >= 0"),
               (not config.flow.resolution_shift and config.flow.shift == 1.0,
                "objective 'meanflow' samples its own (t, r): leave flow.shift at 1 and flow.resolution_shift off")]
  if config.objective == "ladd":
    checks += _ladd_checks(config, kind, section)
  checks += _teacher_data_checks(config)
  if config.objective == "guidance_distill":
    checks += [(bool(section.get("guidance_embed")), "objective 'guidance_distill' needs a student with a guidance "
                f"input: set {kind.train_section or 'model'}.guidance_embed=True"),
               (len(config.distill.guidance_range) == 2 and 0 <= lo <= hi,
                f"distill.guidance_range {list(config.distill.guidance_range)} must be (lo, hi), 0 <= lo <= hi")]
  return checks


def _ladd_checks(config: ml_collections.ConfigDict, kind, section) -> list[tuple[bool, str]]:
  l = config.distill.ladd
  try:
    cfg = kind.model_config(config)
  except (TypeError, ValueError):
    cfg = None  # validate reports the model config's own error
  depth = getattr(cfg, "depth", getattr(cfg, "num_layers", None))
  layers = list(l.layers)
  return [
      (not section.get("guidance_embed") and not section.get("interval_embed"),
       "objective 'ladd' trains a plain student: leave guidance_embed and interval_embed off"),
      (len(l.times) == len(l.probs) > 0 and all(0 < t <= 1 for t in l.times),
       f"distill.ladd.times {list(l.times)} must be noise levels in (0, 1], one per entry of probs"),
      (min(l.probs, default=-1) >= 0 and abs(sum(l.probs) - 1) < 1e-6,
       f"distill.ladd.probs {list(l.probs)} must be non-negative and sum to 1"),
      ((depth is None or all(0 <= i < depth for i in layers)) and len(set(layers)) == len(layers),
       f"distill.ladd.layers {layers} must be distinct teacher block indices in 0..{(depth or 1) - 1}"),
      (l.loss in ("hinge", "softplus"), f"distill.ladd.loss {l.loss!r} is not 'hinge' or 'softplus'"),
      (l.r1_weight >= 0 and l.r1_sigma >= 0 and l.renoise_scale >= 0,
       "distill.ladd needs r1_weight, r1_sigma and renoise_scale >= 0"),
      (l.d_lr > 0 and 0 <= l.d_b1 < 1 and 0 <= l.d_b2 < 1, "distill.ladd needs d_lr > 0 and d_b1, d_b2 in [0, 1)"),
      (l.head_channels > 0 and l.cmap_dim > 0 and l.head_groups > 0 and l.head_channels % l.head_groups == 0,
       f"distill.ladd.head_channels {l.head_channels} must be a positive multiple of head_groups {l.head_groups}"),
  ]


def _teacher_data_checks(config: ml_collections.ConfigDict) -> list[tuple[bool, str]]:
  t = config.distill.teacher_data
  s = t.sample
  if not t.num_samples:
    return [(t.num_samples == 0, f"distill.teacher_data.num_samples {t.num_samples} must be >= 0 (0 = real data)")]
  return [
      (t.num_samples > 0, f"distill.teacher_data.num_samples {t.num_samples} must be >= 0 (0 = real data)"),
      (bool(config.teacher.checkpoint), "distill.teacher_data samples the teacher: set teacher.checkpoint"),
      (t.shard_size > 0 and t.batch_size >= 0, f"distill.teacher_data needs shard_size > 0 (got {t.shard_size}) "
                                                f"and batch_size >= 0 (got {t.batch_size}; 0 = global_batch_size)"),
      (s.method in flow.METHODS, f"distill.teacher_data.sample.method {s.method!r} is not one of the flow samplers "
                                 f"{', '.join(flow.METHODS)}"),
      (s.steps > 0, f"distill.teacher_data.sample.steps {s.steps} must be positive"),
      (s.cfg_scale >= 0 and s.shift >= 0, "distill.teacher_data.sample needs cfg_scale >= 0 and shift >= 0 (0 = "
                                          "flow.shift)"),
      (s.cfg_mode in CFG_MODES, f"distill.teacher_data.sample.cfg_mode {s.cfg_mode!r} is not one of "
                                f"{', '.join(CFG_MODES)}"),
  ]


def validate(config: ml_collections.ConfigDict) -> None:
  """Raise a one-line ValueError for a key the schema does not define or an impossible value."""
  _check_keys(config, default_config())
  kind = kinds.KINDS.get(config.model.kind)
  checks = [
      (kind is not None and bool(kind.batch_ndims),
       f"model.kind {config.model.kind!r} is not one of "
       f"{', '.join(repr(k.name) for k in kinds.KINDS.values() if k.batch_ndims)}"),
      (config.objective in OBJECTIVES or config.objective in distill.OBJECTIVES,
       f"objective {config.objective!r} is not one of {', '.join(map(repr, [*OBJECTIVES, *distill.OBJECTIVES]))}"),
      (config.compute_dtype in ("float32", "bfloat16"), f"compute_dtype {config.compute_dtype!r}"),
      (config.global_batch_size > 0 and config.total_steps > 0, "global_batch_size and total_steps must be > 0"),
      (config.grad_accum_steps > 0 and config.global_batch_size % config.grad_accum_steps == 0,
       "global_batch_size must be divisible by grad_accum_steps"),
      (config.optimizer.schedule in ("constant", "cosine"), f"optimizer.schedule {config.optimizer.schedule!r}"),
      (0.0 <= config.ema_decay < 1.0, f"ema_decay {config.ema_decay} is not in [0, 1)"),
      (not config.flow.resolution_shift or config.flow.shift == 1.0,
       f"flow.resolution_shift replaces flow.shift; leave flow.shift at 1.0, not {config.flow.shift}"),
  ]
  check_all(checks, "invalid config")
  check_all(kind.train_checks(config), "invalid config")
  check_all(eval_checks(config), "invalid config")
  check_all(distill_checks(config, kind), "invalid config")
  kind.model_config(config)  # the model config's own one-line errors (e.g. "invalid MMDiT config: ...")
