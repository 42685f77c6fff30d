"""Shared test setup: torch before TensorFlow, float32 at full precision, the modules left out under
-m "not tf" and without -m onnx, the train.py environment fixture. Helpers live in tests/helpers.py."""

import os

try:  # torch/torchvision must be loaded before TensorFlow: the reverse order segfaults (torch 2.14 + TF 2.21)
  import torch  # noqa: F401
  import torchvision  # noqa: F401
except ImportError:
  pass

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

# Modules marked tf as a whole that import TensorFlow at the top: a run that deselects tf tests (the current-JAX
# CI line, which has no TensorFlow) does not import them either.
TF_MODULES = {"test_data_augment.py", "test_data_coco2017.py", "test_data_coco_folder.py", "test_data_formats.py",
              "test_data_pipeline.py"}


# Modules marked onnx that need the ONNX venv (requirements-onnx.txt: jax2onnx, onnxruntime; no TensorFlow or
# torch), collected only when the -m expression selects onnx: pytest -m onnx.
ONNX_MODULES = {"test_export_onnx.py"}


def pytest_ignore_collect(collection_path, config):
  markexpr = config.option.markexpr or ""
  if collection_path.name in TF_MODULES and "not tf" in markexpr:
    return True
  if collection_path.name in ONNX_MODULES and ("onnx" not in markexpr or "not onnx" in markexpr):
    return True
  return None


@pytest.fixture(scope="session")
def train_cli(tmp_path_factory):
  """What train.py subprocesses share (test_train.py, test_multihost.py): the environment (a persistent
  compilation cache, this process's XLA flags, no inherited multi-process settings), the tiny synthetic dataset
  (generated here once: concurrent processes would race to write it) and a scratch directory."""
  from ssdlite_jax.data import config as data_config, pipeline
  from tests.helpers import xla_flags

  tmp = tmp_path_factory.mktemp("train_cli")
  data_dir = str(tmp / "tfds")
  cfg = data_config.default_data_config()
  cfg.update(data_dir=data_dir, synthetic_num_train=24, synthetic_num_val=6)
  pipeline.open_source(cfg)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
             XLA_FLAGS=xla_flags())
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(key, None)
  return {"env": env, "data_dir": data_dir, "tmp": tmp}
