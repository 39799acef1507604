"""Training across devices and processes (subprocesses: device counts must be fixed before JAX starts).

* 8 simulated devices: 5 steps on meshes (8,1,1), (2,4,1), (2,2,2) give the single-device parameters within 1e-5.
* A checkpoint saved on 8 devices restores on 4 and on 1 device and training continues.
* Two processes joined by jax.distributed on 127.0.0.1 train, checkpoint and resume.
"""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

from tests.helpers import REPO_ROOT
from tests.helpers.processes import PRELUDE, device_env, run_on_devices
from tests.helpers.training import losses


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
  out = run_on_devices(MESH_SCRIPT, 8).stdout
  assert out.count("rel_err") == 3


TRAIN_SCRIPT = """
    workdir, steps, shape = sys.argv[1], int(sys.argv[2]), tuple(int(s) for s in sys.argv[3].split(","))
    config = tiny_config("flow", steps=steps)
    config.checkpoint_every_steps = 4
    state = train(config, workdir, loader=ToyLoader(8), mesh=parallel.make_mesh(shape))
    print("devices", jax.device_count(), "step", int(state.step))
"""


def test_checkpoint_saved_on_8_devices_restores_on_4_and_1(tmp):
  run_on_devices(TRAIN_SCRIPT, 8, tmp / "w8", 4, "2,2,2")
  for devices, shape in ((4, "4,1,1"), (1, "1,1,1")):
    work = tmp / f"w{devices}"
    subprocess.run(["cp", "-r", str(tmp / "w8"), str(work)], check=True)
    out = run_on_devices(TRAIN_SCRIPT, devices, work, 6, shape).stdout
    assert f"devices {devices} step 6" in out
  reference = tmp / "ref"
  run_on_devices(TRAIN_SCRIPT, 1, reference, 6, "1,1,1")
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


@contextlib.contextmanager
def _reserved_port():
  """A free TCP port, held for the whole run. jax.distributed cannot tell us a port it picked itself (binding port 0
  is not reported back), and bind-close-reuse races with every other process. So the port stays bound (never
  listening) by a socket with SO_REUSEPORT: no other process can bind it, nor can the kernel hand it out as an
  ephemeral port, while the coordinator's gRPC server, which sets SO_REUSEPORT too (same user), binds it alongside
  and alone accepts connections. Were it to lose the bind anyway, process 0 dies at once and the test fails fast."""
  with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]


def _two_processes(workdir, steps, timeout=300):
  code = PRELUDE.format(root=str(REPO_ROOT)) + textwrap.dedent(TWO_PROCESS_SCRIPT)
  logs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(2)]  # pipes could fill up
  with _reserved_port() as port:
    procs = [subprocess.Popen([sys.executable, "-c", code, str(port), str(i), str(workdir), str(steps)],
                              stdout=out, stderr=err, text=True, env=device_env(2), cwd=REPO_ROOT)
             for i, (out, err) in enumerate(logs)]
    try:  # one process failing (e.g. the coordinator) must not leave the other waiting for it until the timeout
      deadline = time.monotonic() + timeout
      while any(p.poll() is None for p in procs) and all(p.poll() in (None, 0) for p in procs):
        assert time.monotonic() < deadline, "two-process training timed out"
        time.sleep(0.2)
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
        p.wait()
  texts = []
  for files in logs:
    for f in files:
      f.seek(0)
    texts.append(tuple(f.read() for f in files))
    for f in files:
      f.close()
  for i, (p, (_, err)) in enumerate(zip(procs, texts)):
    assert p.returncode == 0, f"process {i} exited with {p.returncode}: {err[-4000:]}"
  return [out for out, _ in texts]


def test_two_processes_train_checkpoint_and_resume(tmp):
  outs = _two_processes(tmp / "w", 3)
  assert "process 0 step 3" in outs[0] and "process 1 step 3" in outs[1]
  outs = _two_processes(tmp / "w", 6)  # resumes from the step-3 checkpoint
  assert "process 0 step 6" in outs[0] and "process 1 step 6" in outs[1]
  reference = tmp / "single"
  run_on_devices(TRAIN_SCRIPT, 4, reference, 6, "2,2,1")
  got, want = losses(tmp / "w"), losses(reference)
  np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=1e-5)
