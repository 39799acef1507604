"""Streaming conversion: safetensors read lazily (LazyTensor, bit-exact), apply_table reading one tensor at a time,
and the peak memory of a whole conversion (a synthetic fp16 DiT and a synthetic bf16 BFL-layout FLUX converted in a
subprocess) bounded by the fp32 output plus 2 GiB above the process's baseline after imports."""
from __future__ import annotations


import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

import dit_jax
from dit_jax.convert import dit_tables, engine, flux_tables
from dit_jax.convert.files import convert
from dit_jax.convert.readers import LazyTensor, load_all, read_source
from dit_jax.models.dit import DiT, DiTConfig
from dit_jax.models.flux import Flux, FluxConfig
from tests.helpers.processes import conversion_peak

HEADROOM = 2 << 30  # allowed above the fp32 output: one source tensor, orbax / tensorstore buffers, allocator slack
# The tighter streaming criterion: the output, a few copies of the largest parameter (its source, its fp32 cast, the
# device array) and a fixed allowance for XLA / orbax threads. The eager converter this replaced used 3.4 GiB for the
# 1 GiB case (bound 3.0 GiB) and 932 MiB for the 150 MiB one (bound 750 MiB).
TENSORS, FIXED = 3, 384 << 20



def synthetic_dit(path, hidden: int, depth: int, seed: int = 0) -> tuple[DiTConfig, int, int]:
  """An original-layout fp16 DiT state dict with every key the table wants (values tiled from a random block), saved
  as safetensors; returns its config, the bytes of its fp32 parameters and those of the largest one."""
  cfg = DiTConfig(input_size=32, patch_size=2, in_channels=4, hidden_size=hidden, depth=depth,
                  num_heads=16 if hidden == 1152 else hidden // 64,  # as infer_config guesses: the paper's XL heads
                  num_classes=1000)
  abstract = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
  targets = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(abstract))}
  block = (np.random.default_rng(seed).standard_normal(1 << 20) * 0.02).astype(np.float16)
  tensors = {}
  for rule in dit_tables.original_table(cfg):
    for key, shape in zip(rule.sources, engine.source_shapes(rule, targets[rule.target].shape, cfg)):
      tensors[key] = np.resize(block, shape)
  save_numpy(tensors, str(path))
  sizes = [int(np.prod(t.shape)) * 4 for t in targets.values()]
  return cfg, sum(sizes), max(sizes)


def _measure(tmp, hidden: int, depth: int) -> tuple[float, int, DiTConfig]:
  """(peak RSS above the baseline, fp32 output bytes, config) of converting a synthetic DiT in a subprocess."""
  src = tmp / "dit.safetensors"
  cfg, out_bytes, largest = synthetic_dit(src, hidden, depth)
  rise = conversion_peak(src, tmp / "ckpt")
  tight = out_bytes + TENSORS * largest + FIXED
  print(f"\nstreaming conversion of {src.stat().st_size / 2**30:.2f} GiB fp16 (hidden={hidden} depth={depth}): "
        f"peak RSS {rise / 2**30:.2f} GiB above the baseline, fp32 output {out_bytes / 2**30:.2f} GiB, bounds "
        f"{(out_bytes + HEADROOM) / 2**30:.2f} GiB (output + 2 GiB) and {tight / 2**30:.2f} GiB (output + "
        f"{TENSORS} x largest parameter + {FIXED >> 20} MiB)")
  assert rise <= out_bytes + HEADROOM, (f"peak RSS rose {rise / 2**30:.2f} GiB for a {out_bytes / 2**30:.2f} GiB "
                                        f"output (bound: output + {HEADROOM / 2**30:.0f} GiB)")
  assert rise <= tight, f"peak RSS rose {rise / 2**30:.2f} GiB: not streaming (bound {tight / 2**30:.2f} GiB)"
  return rise, out_bytes, cfg


def test_small_conversion_streams(tmp):
  """About 150 MiB of fp16 weights (the CI variant)."""
  _, _, cfg = _measure(tmp, hidden=1152, depth=3)
  source = load_file(tmp / "dit.safetensors")
  model = dit_jax.load(tmp / "ckpt")
  assert model.config == cfg
  kernel = np.asarray(model.blocks[2].mlp.fc1.kernel[...])
  np.testing.assert_array_equal(kernel, source["blocks.2.mlp.fc1.weight"].float().numpy().T)


@pytest.mark.slow
def test_one_gigabyte_conversion_streams(tmp):
  """About 1 GiB of fp16 weights, 2 GiB of fp32 output (slow: 3 GiB of disk and ~5 GiB of memory while CI runs
  two workers)."""
  _measure(tmp, hidden=3072, depth=3)


def synthetic_flux(path, hidden: int, depth: int, single: int, seed: int = 0) -> tuple[FluxConfig, int, int]:
  """A BFL-layout bf16 FLUX (FLUX.1's 128-wide heads, text and latent widths; every key the table wants, values tiled
  from a random block), saved as safetensors; returns its config, the bytes of its fp32 parameters and those of the
  largest one."""
  cfg = FluxConfig(num_layers=depth, num_single_layers=single, num_attention_heads=hidden // 128)
  abstract = nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0)))
  targets = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(abstract))}
  block = (np.random.default_rng(seed).standard_normal(1 << 20) * 0.02).astype(ml_dtypes.bfloat16)
  tensors = {}
  for rule in flux_tables.bfl_table(cfg):
    for key, shape in zip(rule.sources, engine.source_shapes(rule, targets[rule.target].shape, cfg, flux_tables.OPS)):
      tensors[key] = np.resize(block, shape)
  save_numpy(tensors, str(path))
  sizes = [int(np.prod(t.shape)) * 4 for t in targets.values()]
  return cfg, sum(sizes), max(sizes)


def _measure_flux(tmp, hidden: int, depth: int, single: int) -> tuple[float, int, FluxConfig]:
  """(peak RSS above the baseline, fp32 output bytes, config) of converting a synthetic BFL FLUX in a subprocess."""
  src = tmp / "flux.safetensors"
  cfg, out_bytes, largest = synthetic_flux(src, hidden, depth, single)
  rise = conversion_peak(src, tmp / "ckpt")
  tight = out_bytes + TENSORS * largest + FIXED
  print(f"\nstreaming conversion of a {src.stat().st_size / 2**30:.2f} GiB bf16 BFL FLUX (hidden={hidden} "
        f"double={depth} single={single}): peak RSS {rise / 2**30:.2f} GiB above the baseline, fp32 output "
        f"{out_bytes / 2**30:.2f} GiB, bounds {(out_bytes + HEADROOM) / 2**30:.2f} and {tight / 2**30:.2f} GiB")
  assert rise <= out_bytes + HEADROOM, (f"peak RSS rose {rise / 2**30:.2f} GiB for a {out_bytes / 2**30:.2f} GiB "
                                        f"output (bound: output + {HEADROOM / 2**30:.0f} GiB)")
  assert rise <= tight, f"peak RSS rose {rise / 2**30:.2f} GiB: not streaming (bound {tight / 2**30:.2f} GiB)"
  return rise, out_bytes, cfg


def test_small_flux_conversion_streams(tmp):
  """About 140 MiB of bf16 BFL-layout weights (the CI variant), read back bit-exactly."""
  _, _, cfg = _measure_flux(tmp, hidden=768, depth=2, single=2)
  source = read_source(tmp / "flux.safetensors").tensors
  model = dit_jax.load(tmp / "ckpt")
  assert model.config == cfg
  kernel = np.asarray(model.single_blocks[1].linear1.kernel[...])
  np.testing.assert_array_equal(kernel, source["single_blocks.1.linear1.weight"].astype(np.float32).T)


@pytest.mark.slow
def test_one_gigabyte_flux_conversion_streams(tmp):
  """About 1 GiB of bf16 BFL-layout weights (FLUX.1's width: one double and one single block), 2 GiB of fp32
  output."""
  _measure_flux(tmp, hidden=3072, depth=1, single=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool], ids=str)
def test_lazy_safetensors_are_bit_exact(tmp, dtype):
  rng = torch.Generator().manual_seed(0)
  tensors = {"a.weight": torch.randn(5, 3, generator=rng).to(dtype), "b": torch.randn(7, generator=rng).to(dtype),
             "scalar": torch.tensor(2.5).to(dtype), "empty": torch.zeros(0, 4).to(dtype)}
  save_file(tensors, tmp / "x.safetensors")
  lazy = read_source(tmp / "x.safetensors", lazy=True).tensors
  assert all(isinstance(v, LazyTensor) for v in lazy.values())
  eager = read_source(tmp / "x.safetensors").tensors
  for key, ref in tensors.items():
    want = ref.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if dtype == torch.bfloat16 else ref.numpy()
    assert (lazy[key].shape, lazy[key].dtype, lazy[key].ndim) == (want.shape, want.dtype, want.ndim), key
    for got in (lazy[key].numpy(), np.asarray(lazy[key]), load_all(lazy)[key], eager[key]):
      assert got.dtype == want.dtype and got.shape == want.shape
      assert got.tobytes() == want.tobytes(), key


def test_safetensors_header_length_starting_with_0x80_is_not_a_pickle(tmp):
  """A header of 128 + 256k bytes starts the file with 0x80 (a pickle's first byte): still read as safetensors,
  from its own byte ranges (torch.load would memory-map it, and every page read would count towards the RSS)."""
  tensors = {"w": torch.randn(4, 3)}
  for pad in range(64):
    save_file(tensors, tmp / "x.safetensors", metadata={"pad": "x" * pad})
    if (tmp / "x.safetensors").read_bytes()[0] == 0x80:
      break
  assert (tmp / "x.safetensors").read_bytes()[0] == 0x80
  lazy = read_source(tmp / "x.safetensors", lazy=True).tensors["w"]
  assert lazy.read.func.__name__ == "_read_range" and np.array_equal(lazy.numpy(), tensors["w"].numpy())


def test_torch_files_are_read_lazily(tmp):
  tensors = {"w": torch.randn(4, 3), "h": torch.randn(2).half()}
  torch.save(tensors, tmp / "x.pt")
  lazy = read_source(tmp / "x.pt", lazy=True).tensors
  assert all(isinstance(v, LazyTensor) for v in lazy.values())
  assert lazy["h"].dtype == np.float16 and lazy["w"].shape == (4, 3)
  assert np.array_equal(lazy["w"].numpy(), tensors["w"].numpy())


def test_apply_table_reads_each_tensor_once_and_keeps_the_callers_dict(tmp):
  """A lazy source is read rule by rule, each tensor once (diffusers' tied embedder copies included), and the
  dict passed in is left as it was (a second conversion from it works)."""
  from tests.helpers.reference import diffusers_dit

  diffusers_dit(depth=3).save_pretrained(tmp / "dit")
  source = read_source(tmp / "dit", lazy=True)
  reads: dict[str, int] = {}

  def counting(key, tensor):
    def read():
      reads[key] = reads.get(key, 0) + 1
      return tensor.numpy()
    return LazyTensor(tensor.shape, tensor.dtype, read, key)

  tensors = {k: counting(k, v) for k, v in source.tensors.items()}
  before = dict(tensors)
  cfg = dit_tables.infer_config(tensors, "diffusers", source.diffusers_config)
  assert not reads, "config inference must read shapes only"
  first = dit_tables.to_model(tensors, cfg, "diffusers")
  assert tensors == before and set(reads) == set(tensors) and set(reads.values()) == {1}
  second = dit_tables.to_model(tensors, cfg, "diffusers")
  a, b = (dit_jax.checkpoint.flat_params(m) for m in (first, second))
  assert all(np.array_equal(a[k], b[k]) for k in a)


def test_converted_checkpoint_equals_eager_tables(tmp):
  """The streamed convert() writes what the eager tables give (same parameters, bit for bit)."""
  from tests.helpers.reference import diffusers_dit

  diffusers_dit(depth=2).save_pretrained(tmp / "dit")
  convert(tmp / "dit", tmp / "ckpt")
  source = read_source(tmp / "dit")
  cfg = dit_tables.infer_config(source.tensors, "diffusers", source.diffusers_config)
  eager = dit_jax.checkpoint.flat_params(dit_tables.to_model(source.tensors, cfg, "diffusers"))
  streamed = dit_jax.checkpoint.flat_params(dit_jax.load(tmp / "ckpt"))
  assert eager.keys() == streamed.keys() and all(np.array_equal(eager[k], streamed[k]) for k in eager)
