"""DDP semantics of the train step on 8 simulated CPU devices, float64 so that only float64 rounding separates the
layouts: SSD's per-device BN and loss normaliser with averaged gradients, sync BN, a NaN on one device, and a
Faster R-CNN step whose devices sample with their own keys.

The checks need XLA_FLAGS and 64-bit JAX set before anything runs, so the test runs them in a subprocess
(`python -m tests.test_data_parallel`).
"""

import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from ssdlite_jax import optim
from ssdlite_jax.distributed import AXIS, make_mesh, shard_batch
from ssdlite_jax.rcnn.configs import fasterrcnn_mobilenet_v3_large_320_fpn_config
from ssdlite_jax.train_step import create_train_state, make_train_step
from ssdlite_jax.zoo import build_model
from tests.helpers import REPO, assert_same_update, subprocess_env
from tests.test_train_step import _optim_config, _small_batch, _small_config
from tests.torch_reference import smooth_images

NUM_DEVICES = 8
pytestmark = pytest.mark.slow  # compiles for 8 devices, in a subprocess


def test_data_parallel_steps_on_8_devices():
  proc = subprocess.run([sys.executable, "-m", "tests.test_data_parallel"], cwd=REPO,
                        env=subprocess_env(NUM_DEVICES, quick_compile=True), capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
  assert "multidevice checks passed" in proc.stdout


def _tree_mean(trees):
  return jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0).astype(xs[0].dtype), *trees)


# The 8-device checks compare our step with itself under two layouts, in float64 so that only float64 rounding
# separates them (in float32, at init, summation-order noise and kink flips move whole tensors by 1e-5 to 1e-2
# of their update). Measured: DDP 8 x 8 images vs the mean of 8 single-device steps, and sync BN 8 x 2 vs one
# device on 16 images: every tensor within 2e-14 of its update, and within 3e-19 of the largest update (running
# means of zero-mean features, whose update is rounding noise).
DDP_UPDATE_RTOL, DDP_NOISE_RTOL = 1e-11, 1e-15


def _multidevice_checks():
  """Runs in a process with 8 CPU devices and 64-bit JAX: DDP averaging, sync BN, and a NaN on one device."""
  assert jax.device_count() == NUM_DEVICES, jax.devices()
  det = build_model(_small_config("float64"))
  tx, schedule = optim.make_optimizer(_optim_config(), steps_per_epoch=100)
  variables = jax.device_get(det.init(jax.random.key(0)))
  mesh, mesh1 = make_mesh(), make_mesh(jax.devices()[:1])
  det_sync = build_model(det.config, bn_axis_name=AXIS)
  step, step_sync = (make_train_step(d, tx, schedule, mesh) for d in (det, det_sync))
  step1 = make_train_step(det, tx, schedule, mesh1)   # compiled once: always 8 images

  def run(step_fn, mesh, batch):
    state = create_train_state(det, tx, jax.random.key(0), mesh, variables)
    return jax.device_get(step_fn(state, shard_batch(batch, mesh)))

  # 8 images per device. Per-device BN and loss normaliser, averaged gradients: the mean of 8
  # single-device steps (the first SGD step is linear in the gradient, the running statistics in
  # the batch statistics).
  batch = _small_batch(8 * NUM_DEVICES, seed=5, dtype=np.float64)
  state, metrics = run(step, mesh, batch)
  singles = [run(step1, mesh1, {k: v[8 * i:8 * i + 8] for k, v in batch.items()})
             for i in range(NUM_DEVICES)]
  assert_same_update(state.variables, _tree_mean([s.variables for s, _ in singles]), variables,
                      DDP_UPDATE_RTOL, DDP_NOISE_RTOL)
  for k in ("loss", "bbox_regression", "classification"):
    np.testing.assert_allclose(metrics[k], np.mean([m[k] for _, m in singles]), rtol=1e-12)
  assert metrics["num_positives"] == sum(m["num_positives"] for _, m in singles)

  # 2 images per device with sync BN: as each image has as many positives, the mean of the per-device
  # normalised losses is the whole-batch loss, and the step equals one device's on all 16 images.
  batch = _small_batch(2 * NUM_DEVICES, seed=6, dtype=np.float64)
  state_sync, metrics_sync = run(step_sync, mesh, batch)
  state_whole, metrics_whole = run(step1, mesh1, batch)
  assert_same_update(state_sync.variables, state_whole.variables, variables, DDP_UPDATE_RTOL, DDP_NOISE_RTOL)
  for k in ("loss", "num_positives", "grad_norm"):
    np.testing.assert_allclose(metrics_sync[k], metrics_whole[k], rtol=1e-12)

  # A NaN on one device is flagged everywhere and leaves the state untouched.
  batch = _small_batch(8 * NUM_DEVICES, seed=5, dtype=np.float64)
  batch["image"][8 * 3 + 2, 5, 5, 0] = np.nan
  state_nan, metrics_nan = run(step, mesh, batch)
  assert not metrics_nan["finite"] and int(state_nan.step) == 0
  jax.tree.map(np.testing.assert_array_equal, state_nan.variables, variables)
  _faster_rcnn_multidevice_check()
  print("multidevice checks passed")


def _faster_rcnn_multidevice_check(devices=2, per_device=2):
  """A small Faster R-CNN (width 0.25, float64) on `devices` devices x `per_device` images: each device samples its
  anchors and RoIs with its own key (the step's: fold_in(fold_in(rng, step), device)) and normalises its own
  losses, the gradients are averaged (torchvision's DDP: each process's loss on its images). The step equals that
  computed one device's images at a time on one device (measured: every tensor within 7e-16 of its update)."""
  config = fasterrcnn_mobilenet_v3_large_320_fpn_config()
  config.update(num_classes=4, min_size=96, max_size=256, rpn_pre_nms_top_n_train=300,
                rpn_post_nms_top_n_train=300, dtype="float64")
  config.backbone_kwargs.width_mult = 0.25
  det = build_model(config)
  tx, schedule = optim.make_optimizer(_optim_config(), steps_per_epoch=100)
  variables = jax.device_get(det.init(jax.random.key(1)))
  mesh = make_mesh(jax.devices()[:devices])
  n, (h, w), width = devices * per_device, (96, 128), 120   # images resized to 96 x 120 on a 96 x 128 canvas
  rs = np.random.RandomState(7)
  images = smooth_images(n, h, w, seed=7).astype(np.float64)
  images[:, :, width:] = 0
  xy = rs.uniform(0, 70, (n, 4, 2))
  boxes = np.concatenate([xy, np.minimum(xy + rs.uniform(10, 60, (n, 4, 2)), [width, h])], -1)
  mask = np.arange(4) < rs.randint(1, 4, (n, 1))   # 1 to 3 boxes, the rest padding
  batch = dict(image=images, image_size=np.tile(np.int32([h, width]), (n, 1)),
               boxes=np.where(mask[..., None], boxes, 0),
               labels=np.where(mask, rs.randint(1, 4, (n, 4)), 0).astype(np.int32), mask=mask)
  state = create_train_state(det, tx, jax.random.key(0), mesh, variables)
  keys = [jax.random.fold_in(jax.random.fold_in(state.rng, 0), d) for d in range(devices)]
  state, metrics = jax.device_get(make_train_step(det, tx, schedule, mesh)(state, shard_batch(batch, mesh)))

  def device_loss(params, images_of_one_device, key):
    loss = det.loss({"params": params, "batch_stats": variables["batch_stats"]}, images_of_one_device, key)
    return loss.total, loss

  grad_fn = jax.jit(jax.value_and_grad(device_loss, has_aux=True))
  results = [grad_fn(variables["params"], {k: v[d * per_device:(d + 1) * per_device] for k, v in batch.items()},
                     keys[d]) for d in range(devices)]
  grads = _tree_mean([jax.device_get(g) for _, g in results])
  updates, _ = tx.update(grads, tx.init(variables["params"]), variables["params"])
  assert_same_update(state.params, optax.apply_updates(variables["params"], updates), variables["params"],
                     DDP_UPDATE_RTOL, DDP_NOISE_RTOL)
  losses = [jax.device_get(loss) for (_, loss), _ in results]
  np.testing.assert_allclose(metrics["loss"], np.mean([x.total for x in losses]), rtol=1e-12)
  for k in losses[0].terms:
    np.testing.assert_allclose(metrics[k], np.mean([x.terms[k] for x in losses]), rtol=1e-12, err_msg=k)
  for k in losses[0].counts:
    assert metrics[k] == sum(x.counts[k] for x in losses) > 0, k


if __name__ == "__main__":
  jax.config.update("jax_enable_x64", True)
  _multidevice_checks()
