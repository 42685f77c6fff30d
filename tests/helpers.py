"""Test helpers: optional imports that may skip only outside CI, XLA flags and the train.py command for
subprocesses."""

import importlib
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_or_skip(name):
  """Imports `name` (e.g. "torchvision"); skips the test when missing, except under CI=true."""
  try:
    return importlib.import_module(name)
  except ImportError:
    if os.environ.get("CI") == "true":
      raise
    pytest.skip(f"{name} is not installed (pip install -r requirements-dev.txt)")


def xla_flags(device_count=None):
  """This process's XLA_FLAGS (e.g. --xla_cpu_max_isa=AVX2) for a subprocess, with its own simulated CPU
  device count (none by default) instead of any inherited one."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if device_count:
    flags.append(f"--xla_force_host_platform_device_count={device_count}")
  return " ".join(flags)


def train_command(train_cli, workdir, *, batch, steps, lr, overrides=()):
  """train.py on the tiny synthetic dataset of the `train_cli` fixture (24 train / 6 val images at 160 px), SGD
  at `lr` for global batch `batch`, `steps` steps, train metrics logged every step, evaluation only at the end."""
  return [sys.executable, os.path.join(REPO, "train.py"), "--config", os.path.join(REPO, "configs/synthetic.py"),
          "--workdir", str(workdir), f"--config.data.data_dir={train_cli['data_dir']}",
          "--config.data.synthetic_num_train=24", "--config.data.synthetic_num_val=6",
          f"--config.batch_size={batch}", "--config.model.image_size=160",
          f"--config.max_steps={steps}", "--config.eval_every_epochs=0", "--config.log_every_steps=1",
          "--config.optim.warmup_iters=0", "--config.optim.optimizer=sgd",
          f"--config.optim.learning_rate={lr}", f"--config.optim.base_batch_size={batch}", *overrides]
