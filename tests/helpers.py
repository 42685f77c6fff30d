"""Test helpers: optional imports that may skip only outside CI, the environment and the train.py command for
subprocesses, checkpoints committed in a bucket, detections compared one to one, an HTTP server on localhost."""

import http.server
import importlib
import os
import sys
import threading

import numpy as np
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


# XLA's LLVM back end at -O0 for mechanics (train.py runs, the 8-device step checks, the tiny steps whose outcome is
# checked, not compared with a reference): they compile far more than they compute. Measured on 2 cores: a cold
# tiny train.py run 70 s -> 46 s wall (84 -> 51 CPU-s), the tiny bf16 step's compile 39 -> 28 s (jax 0.12: 34 ->
# 21 s); the full-size step runs 3.4x slower at -O0, and its rounding moves like another CPU's, so parity tests
# keep XLA's defaults. QUICK_COMPILE_OPTIONS for Lowered.compile in process, QUICK_COMPILE for XLA_FLAGS.
QUICK_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}
QUICK_COMPILE = " ".join(f"--{k}={v}" for k, v in QUICK_COMPILE_OPTIONS.items())


def xla_flags(device_count=None, quick_compile=False):
  """This process's XLA_FLAGS (e.g. --xla_cpu_max_isa=AVX2) for a subprocess, with its own simulated CPU
  device count (none by default) instead of any inherited one, and QUICK_COMPILE if `quick_compile`."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if device_count:
    flags.append(f"--xla_force_host_platform_device_count={device_count}")
  if quick_compile:
    flags.append(QUICK_COMPILE)
  return " ".join(flags)


def subprocess_env(device_count=None, quick_compile=False, **extra):
  """The environment of a Python subprocess: this one's, with the run's one compilation cache (conftest.py; the
  programs the subprocess shares with others compile once per test run), this process's XLA flags with
  `device_count` simulated CPU devices (none by default) and QUICK_COMPILE if `quick_compile`, no inherited
  multi-process settings, TF's C++ INFO lines off, then `extra`."""
  import jax
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             XLA_FLAGS=xla_flags(device_count, quick_compile), TF_CPP_MIN_LOG_LEVEL="2")
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(key, None)
  env.update(extra)
  return env


TINY = {"image_size": 128, "width_mult": 0.25}   # the tiny model's input size and width (tiny_model_config)


def tiny_model_config(**overrides):
  """The tests' small model for mechanics (checkpoints, multi-device steps, train.py runs, export plumbing):
  SSDlite320's code paths at a quarter of the width on 128 px inputs, 4 classes (the synthetic dataset's 3 and
  background). Parity tests use the full-size models instead."""
  from ssdlite_jax.ssd.configs import ssdlite320_config
  config = ssdlite320_config()
  config.update({"image_size": TINY["image_size"], "num_classes": 4, **overrides})
  config.backbone_kwargs.width_mult = TINY["width_mult"]
  return config


def train_command(train_cli, workdir, *, batch, steps, lr, extras=False, overrides=()):
  """train.py on the tiny synthetic dataset of the `train_cli` fixture (24 train / 6 val images) with the tiny
  model (tiny_model_config), SGD at `lr` for global batch `batch`, `steps` steps, train metrics logged every step,
  evaluation only at the end; the plots and the GFLOP count only with `extras`."""
  return [sys.executable, os.path.join(REPO, "train.py"), "--config", os.path.join(REPO, "configs/synthetic.py"),
          "--workdir", str(workdir), f"--config.data.data_dir={train_cli['data_dir']}",
          "--config.data.synthetic_num_train=24", "--config.data.synthetic_num_val=6",
          f"--config.batch_size={batch}", f"--config.model.image_size={TINY['image_size']}",
          f"--config.model.backbone_kwargs.width_mult={TINY['width_mult']}",
          f"--config.plots={extras}", f"--config.count_flops={extras}",
          f"--config.max_steps={steps}", "--config.eval_every_epochs=0", "--config.log_every_steps=1",
          "--config.optim.warmup_iters=0", "--config.optim.optimizer=sgd",
          f"--config.optim.learning_rate={lr}", f"--config.optim.base_batch_size={batch}", *overrides]


def committed_steps(workdir):
  """The checkpoint steps orbax finished in a bucket workdir, sorted (it marks one with commit_success.txt: object
  storage has no atomic rename); [] before its checkpoints/ folder exists."""
  from etils import epath
  folder = epath.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if (p / "commit_success.txt").exists()) if folder.exists() else []


def assert_same_detections(got, want, score_atol, box_atol):
  """got and want: (boxes [n, 4] xyxy px, names or labels [n], scores [n]); the same detections, one to one, in
  any order among scores equal within score_atol (runtimes order those differently): each got row takes the
  closest unmatched want row of its name within the tolerances."""
  assert len(got[1]) == len(want[1]) > 0, (len(got[1]), len(want[1]))
  unmatched = list(range(len(want[1])))
  for box, name, score in zip(*got):
    gaps = [(abs(want[2][j] - score) / score_atol, np.abs(want[0][j] - box).max() / box_atol, j) for j in unmatched
            if want[1][j] == name]
    fits = [(s + b, j) for s, b, j in gaps if s <= 1 and b <= 1]
    assert fits, (box, name, score)
    unmatched.remove(min(fits)[1])


def assert_same_update(got, want, start, update_rtol, noise_rtol=0.0):
  """Per tensor (pytrees or dicts of the same structure), in float64:
  |got - want| <= 4 eps |want| + update_rtol max|want - start| + noise_rtol max over all tensors of |want - start|.

  update_rtol bounds the error relative to the size of the step (an atol scaled by the params would hide a wrong
  update); 4 eps covers the rounding of `param + update`; noise_rtol is for tensors whose update is zero in exact
  arithmetic (the beta of a BN that feeds another BN through a linear conv, running means of zero-mean features):
  their rounding is relative to the terms that cancel, i.e. to the step, not to the (zero) result.
  """
  import jax
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(got)]
  got, want, start = (jax.tree.leaves(t) for t in (got, want, start))
  step = max(float(np.max(np.abs(np.float64(b) - s))) for b, s in zip(want, start) if np.asarray(b).dtype.kind == "f")
  for name, a, b, s in zip(names, got, want, start):
    if np.asarray(b).dtype.kind != "f":   # num_batches_tracked
      np.testing.assert_array_equal(a, b, err_msg=name)
      continue
    scale = np.max(np.abs(np.float64(b) - s))
    np.testing.assert_allclose(a, b, rtol=4 * np.finfo(np.asarray(b).dtype).eps,
                               atol=update_rtol * scale + noise_rtol * step, err_msg=name)


def box_iou(a, b) -> float:
  """IoU of two xyxy boxes (sequences of 4 numbers)."""
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


class Server:
  """Serves the files under `root` on a free localhost port (`url`; others 404) and records the paths asked for in
  `requests`; while `cut` is set it sends a file's whole Content-Length but only half of its bytes, then closes the
  connection (a transfer cut short). `shutdown()` stops it."""

  def __init__(self, root):
    self.requests, self.cut = [], False
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):
        server.requests.append(self.path)
        path = os.path.join(root, self.path.lstrip("/"))
        if not os.path.isfile(path):
          self.send_error(404)
          return
        with open(path, "rb") as f:
          data = f.read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:len(data) // 2] if server.cut else data)
        self.close_connection = True

      def log_message(self, *args):
        pass

    self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
    threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

  def shutdown(self):
    self._httpd.shutdown()
