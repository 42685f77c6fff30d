"""Shared helpers for the benchmarks: timing, peak RSS, worker subprocesses, synthetic batches."""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_rss_mb() -> float:
  """High-water mark of this process's resident set (MiB; ru_maxrss is KiB on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_calls(fn, n: int, warmup: int = 1):
  """Runs fn() warmup + n times; returns the list of the n wall times in seconds (fn must block)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def median(xs):
  return statistics.median(xs)


def run_worker(module: str, args, env=None, python: str = sys.executable):
  """Runs `python -m module args` (from the repository root) in a fresh process (this interpreter, or another
  venv's `python`); returns the dict printed on its last 'RESULT ' line."""
  cmd = [python, "-m", module] + [str(a) for a in args]
  full_env = dict(os.environ)
  full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if env:
    full_env.update(env)
  # stderr streams through (the worker's progress lines reach a log even if it is killed); stdout is parsed.
  proc = subprocess.run(cmd, env=full_env, cwd=REPO, stdout=subprocess.PIPE, text=True)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    sys.stderr.write(proc.stdout[-4000:])
    raise RuntimeError(f"worker {cmd} failed with exit code {proc.returncode}")
  return json.loads(lines[-1][len("RESULT "):])


def add_worker_flags(parser):
  """--only (one side of the comparison) and --worker (internal: run one side in this process)."""
  parser.add_argument("--only", choices=["ours", "torchvision"], default=None)
  parser.add_argument("--worker", choices=["jax", "torch"], default=None)


def ours_and_torchvision(module: str, args, forwarded, worker_jax, worker_torch):
  """Worker mode (--worker): runs that worker, prints its result and returns None. Otherwise runs each side
  (--only limits it) in a fresh subprocess of `module` (e.g. "bench.inference") with `forwarded` flags and
  returns (ours, torchvision), None for a side not run."""
  if args.worker:
    emit(worker_jax(args) if args.worker == "jax" else worker_torch(args))
    return None
  ours = run_worker(module, forwarded + ["--worker", "jax"]) if args.only != "torchvision" else None
  tv = run_worker(module, forwarded + ["--worker", "torch"]) if args.only != "ours" else None
  return ours, tv


def emit(result):
  """Worker side of run_worker."""
  print("RESULT " + json.dumps(result), flush=True)


# The variants torchvision has a builder for (torchvision.models.detection.<name>): benchmarked side by side.
# Names only: a torch worker must not import jax (its peak RSS is measured).
BUILDERS = ("ssdlite320_mobilenet_v3_large", "ssd300_vgg16", "fasterrcnn_mobilenet_v3_large_320_fpn",
            "fasterrcnn_mobilenet_v3_large_fpn")


def torchvision_detector(name: str, num_classes: int):
  """torchvision's builder `name` with weights=None, weights_backbone=None (fresh from-scratch init)."""
  import torchvision
  return getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None, num_classes=num_classes)


def our_model_config(name: str, num_classes: int):
  """The registered model config of variant `name` with `num_classes`, as torchvision_detector builds it (Faster
  R-CNN: BatchNorm2d, the weights=None layout)."""
  from ssdlite_jax.zoo import TORCHVISION_VARIANTS
  cfg = TORCHVISION_VARIANTS[name]()
  cfg.num_classes = num_classes
  if "frozen_bn" in cfg:
    cfg.frozen_bn = False
  return cfg


def input_side(cfg) -> int:
  """The side of the square synthetic images a model config is benchmarked on: SSD's input size, Faster R-CNN's
  min_size (its transform then keeps the image as it is, on a canvas of the same size)."""
  return cfg.image_size if "image_size" in cfg else cfg.min_size


def recipe_optimizer(batch: int):
  """(tx, schedule) of the timed steps and the loss curves alike (one train-step program for both): the recipe's
  SGD at its LR for global batch `batch`, no warmup, 1000 steps per epoch (a constant LR for 1000 steps)."""
  from ssdlite_jax import optim
  config = optim.default_optim_config()
  config.update(batch_size=batch, warmup_iters=0)
  return optim.make_optimizer(config, steps_per_epoch=1000)


def synthetic_train_batch(batch: int, size: int = 320, num_classes: int = 91, max_boxes: int = 4, seed: int = 0):
  """Smooth random images [B, size, size, 3] float32 in [0, 1] and 1..max_boxes boxes per image.

  Returns numpy (images, boxes [B, M, 4] xyxy px, labels [B, M] int32 (0 = padding), mask [B, M]).
  """
  import numpy as np
  rng = np.random.default_rng(seed)
  low = rng.random((batch, -(-size // 16), -(-size // 16), 3), dtype=np.float32)
  images = np.repeat(np.repeat(low, 16, axis=1), 16, axis=2)[:, :size, :size]
  images = np.clip(images + 0.05 * rng.standard_normal(images.shape, dtype=np.float32), 0, 1).astype(np.float32)
  boxes = np.zeros((batch, max_boxes, 4), np.float32)
  labels = np.zeros((batch, max_boxes), np.int32)
  for b in range(batch):
    n = int(rng.integers(1, max_boxes + 1))
    for m in range(n):
      w, h = rng.uniform(30, 200, 2)
      x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
      boxes[b, m] = [x0, y0, x0 + w, y0 + h]
      labels[b, m] = int(rng.integers(1, num_classes))
  return images, boxes, labels, labels > 0


def synthetic_uint8_images(batch: int, height: int = 480, width: int = 640, seed: int = 0):
  import numpy as np
  rng = np.random.default_rng(seed)
  low = rng.integers(0, 256, (batch, height // 16, width // 16, 3), dtype=np.uint8)
  return np.repeat(np.repeat(low, 16, axis=1), 16, axis=2)
