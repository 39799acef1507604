"""Training across devices and processes (subprocesses: device counts must be fixed before JAX starts).

* 8 simulated devices: 5 steps on meshes (8,1,1), (2,4,1), (2,2,2) give the single-device parameters within 1e-5.
* A checkpoint saved on 8 devices restores on 4 and on 1 device and training continues.
* Two processes joined by jax.distributed on 127.0.0.1 train, checkpoint and resume.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

from tests.train_utils import REPO_ROOT, losses

PRELUDE = textwrap.dedent("""
    import sys, json, numpy as np, jax
    jax.config.update("jax_default_matmul_precision", "highest")
    sys.path.insert(0, {root!r})
    from dit_jax import parallel
    from dit_jax.train import Trainer, train
    from tests.train_utils import ToyLoader, tiny_config
""")


def _run(script: str, devices: int, *args, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO_ROOT), **(env_extra or {}))
  code = PRELUDE.format(root=str(REPO_ROOT)) + textwrap.dedent(script)
  result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=timeout)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


MESH_SCRIPT = """
    def params_after_5_steps(mesh):
        config = tiny_config("vp", steps=5)
        trainer = Trainer(config, mesh)
        state, rest = trainer.init()
        loader = ToyLoader(8)
        for _ in range(5):
            state, _ = trainer.step(state, rest, next(loader))
        return [np.asarray(x) for x in jax.tree.leaves(state.params)], state
    assert jax.device_count() == 8
    single, _ = params_after_5_steps(parallel.make_mesh((1, 1, 1), jax.devices()[:1]))
    for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
        params, state = params_after_5_steps(parallel.make_mesh(shape))
        sharded = sum(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
                      for x in jax.tree.leaves(state.params))
        # max |difference| over all parameters relative to the largest parameter (a per-tensor ratio is
        # dominated by zero-initialised biases that have moved ~1e-3 in 5 steps)
        scale = max(float(np.abs(b).max()) for b in single)
        err = max(float(np.abs(a - b).max()) for a, b in zip(params, single)) / scale
        print(json.dumps({"shape": shape, "rel_err": err, "sharded_params": sharded}))
        assert err < 1e-5, (shape, err)
        if shape != (8, 1, 1):
            assert sharded > 0, "fsdp/tensor meshes must actually shard parameters"
"""


def test_meshes_match_single_device():
  out = _run(MESH_SCRIPT, 8).stdout
  assert out.count("rel_err") == 3


TRAIN_SCRIPT = """
    workdir, steps, shape = sys.argv[1], int(sys.argv[2]), tuple(int(s) for s in sys.argv[3].split(","))
    config = tiny_config("flow", steps=steps)
    config.checkpoint_every_steps = 4
    state = train(config, workdir, loader=ToyLoader(8), mesh=parallel.make_mesh(shape))
    print("devices", jax.device_count(), "step", int(state.step))
"""


def test_checkpoint_saved_on_8_devices_restores_on_4_and_1(tmp):
  _run(TRAIN_SCRIPT, 8, tmp / "w8", 4, "2,2,2")
  for devices, shape in ((4, "4,1,1"), (1, "1,1,1")):
    work = tmp / f"w{devices}"
    subprocess.run(["cp", "-r", str(tmp / "w8"), str(work)], check=True)
    out = _run(TRAIN_SCRIPT, devices, work, 6, shape).stdout
    assert f"devices {devices} step 6" in out
  reference = tmp / "ref"
  _run(TRAIN_SCRIPT, 1, reference, 6, "1,1,1")
  want = losses(reference)
  for devices in (4, 1):
    got = losses(tmp / f"w{devices}")
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=1e-5)


TWO_PROCESS_SCRIPT = """
    port, pid, workdir, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    assert jax.process_count() == 2 and jax.device_count() == 4
    config = tiny_config("flow", steps=steps)
    config.checkpoint_every_steps = 3
    loader = ToyLoader(8, process_index=pid, process_count=2)
    state = train(config, workdir, loader=loader, mesh=parallel.make_mesh((2, 2, 1)))
    print("process", pid, "step", int(state.step))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, steps):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO_ROOT))
  code = PRELUDE.format(root=str(REPO_ROOT)) + textwrap.dedent(TWO_PROCESS_SCRIPT)
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-c", code, str(port), str(i), str(workdir), str(steps)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  return [o for o, _ in outs]


def test_two_processes_train_checkpoint_and_resume(tmp):
  outs = _two_processes(tmp / "w", 3)
  assert "process 0 step 3" in outs[0] and "process 1 step 3" in outs[1]
  outs = _two_processes(tmp / "w", 6)  # resumes from the step-3 checkpoint
  assert "process 0 step 6" in outs[0] and "process 1 step 6" in outs[1]
  reference = tmp / "single"
  _run(TRAIN_SCRIPT, 4, reference, 6, "2,2,1")
  got, want = losses(tmp / "w"), losses(reference)
  np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=1e-5)
