"""Shared test setup: float32 at full precision, and torch imports that may skip only outside CI."""

import importlib
import os

try:  # torch/torchvision must be loaded before TensorFlow: the reverse order segfaults (torch 2.14 + TF 2.21)
  import torch  # noqa: F401
  import torchvision  # noqa: F401
except ImportError:
  pass

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


def xla_flags(device_count=None):
  """This process's XLA_FLAGS (e.g. --xla_cpu_max_isa=AVX2) for a subprocess, with its own simulated CPU
  device count (none by default) instead of any inherited one."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if device_count:
    flags.append(f"--xla_force_host_platform_device_count={device_count}")
  return " ".join(flags)


def import_or_skip(name):
  """Imports `name` (e.g. "torchvision"); skips the test when missing, except under CI=true."""
  try:
    return importlib.import_module(name)
  except ImportError:
    if os.environ.get("CI") == "true":
      raise
    pytest.skip(f"{name} is not installed (pip install -r requirements-dev.txt)")
