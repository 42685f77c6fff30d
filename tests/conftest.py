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


def import_or_skip(name):
  """Imports `name` (e.g. "torchvision"); skips the test when missing, except under CI=true."""
  try:
    return importlib.import_module(name)
  except ImportError:
    if os.environ.get("CI") == "true":
      raise
    pytest.skip(f"{name} is not installed (pip install -r requirements-dev.txt)")
