"""Subprocess helpers: the repo's CLIs as users run them, Python scripts on N simulated CPU devices (the device count
must be fixed before JAX starts), and the strict check of a CLI user error."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

from tests.helpers import REPO_ROOT

# Imports every training script run by run_on_devices starts with.
PRELUDE = textwrap.dedent("""
    import sys, json, numpy as np, jax
    jax.config.update("jax_default_matmul_precision", "highest")
    sys.path.insert(0, {root!r})
    from dit_jax import parallel
    from dit_jax.train import Trainer, train
    from tests.helpers.training import ToyLoader, tiny_config
""")

# Log lines the CLIs may print before failing, none of them part of the error: the Python logging formats of
# sample.py / tools ("INFO: ..."), train.py ("2025-01-02 03:04:05,678 INFO: ...") and the C++ (absl) INFO / WARNING
# lines of XLA ("W0102 03:04:05.678901  1234 file.cc:56] ...").
BENIGN_LOG_LINE = re.compile(r"(INFO|WARNING): |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING): "
                             r"|[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\] ")


def device_env(devices: int, **extra) -> dict[str, str]:
  """os.environ for a CPU-only subprocess with ``devices`` simulated devices that can import dit_jax and tests."""
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
              PYTHONPATH=str(REPO_ROOT), **extra)


def main_in_process(script: str, argv, capsys, stdout: list | None = None) -> tuple[int, str]:
  """Run ``<repo>/<script>``'s ``main(argv)`` in this process (fast: JAX already loaded); (exit code, stderr).
  ``stdout``: a list that receives the printed lines."""
  import importlib.util

  spec = importlib.util.spec_from_file_location(f"_cli_{script.replace('.', '_')}", REPO_ROOT / script)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  code = module.main([str(a) for a in argv])
  out = capsys.readouterr()
  if stdout is not None:
    stdout.extend(out.out.splitlines())
  return code, out.err


def run_cli(script: str, *args, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
  """Run a repo script (``sample.py``, ``tools/convert_torch.py``, ...) with this interpreter; output captured."""
  return subprocess.run([sys.executable, str(REPO_ROOT / script), *map(str, args)], capture_output=True, text=True,
                        cwd=REPO_ROOT, env=env, timeout=timeout)


def run_on_devices(script: str, devices: int, *args, env_extra=None, timeout=600) -> subprocess.CompletedProcess:
  """Run PRELUDE + ``script`` (sys.argv[1:] = args) on ``devices`` simulated CPU devices; asserts exit status 0."""
  code = PRELUDE.format(root=str(REPO_ROOT)) + textwrap.dedent(script)
  result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=device_env(devices, **(env_extra or {})), cwd=REPO_ROOT, timeout=timeout)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def one_line_error(status: int, stderr: str, fragment: str | None = None) -> str:
  """Assert a CLI user error: exit status 2, no traceback, and stderr (less BENIGN_LOG_LINEs) exactly one line
  ``error: ...`` containing ``fragment``. Returns that line."""
  lines = [ln for ln in stderr.splitlines() if ln.strip() and not BENIGN_LOG_LINE.match(ln)]
  ok = status == 2 and "Traceback" not in stderr and len(lines) == 1 and lines[0].startswith("error: ")
  assert ok, f"want status 2 and one line 'error: ...', got status {status}, stderr:\n{stderr[-3000:]}"
  assert fragment is None or fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
  return lines[0]


# The subprocess of conversion_peak: imports and the CPU backend belong to the baseline; the peak (VmHWM, reset after
# the imports where the kernel allows) covers the conversion only.
_PEAK_SCRIPT = r"""
import json, sys
import jax.numpy as jnp
import orbax.checkpoint  # noqa: F401
from dit_jax.convert.files import convert

def status(field):
  for line in open("/proc/self/status"):
    if line.startswith(field + ":"):
      return int(line.split()[1]) * 1024

jnp.zeros(1).block_until_ready()
try:
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
except OSError:
  pass
baseline = status("VmRSS")
convert(sys.argv[1], sys.argv[2])
print(json.dumps({"baseline": baseline, "peak": status("VmHWM")}))
"""


def conversion_peak(src, out, timeout: int = 900) -> int:
  """Bytes of peak RSS above the post-import baseline while ``dit_jax.convert.files.convert(src, out)`` runs in a
  fresh one-device CPU process."""
  import json

  result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(src), str(out)], capture_output=True, text=True,
                          env=device_env(1), timeout=timeout, cwd=REPO_ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  measured = json.loads(result.stdout.strip().splitlines()[-1])
  return measured["peak"] - measured["baseline"]
