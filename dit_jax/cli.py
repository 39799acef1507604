"""Command-line conventions shared by sample.py and tools/*.py: a user error is one stderr line ``error: ...`` and
exit status 2."""
from __future__ import annotations

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
  """argparse that reports a usage error (bad choice or type, missing argument) as one ``error: ...`` line with
  status 2, instead of the usage text."""

  def error(self, message: str):
    self.exit(2, f"error: {message}\n")


def fail(e: BaseException | str) -> int:
  """Print the first line of an error as ``error: ...`` on stderr; returns the exit status, 2."""
  text = str(e).strip()
  print(f"error: {text.splitlines()[0] if text else type(e).__name__}", file=sys.stderr)
  return 2
