"""Training step: one SGD step against live torchvision (exact in float64; in float32 within torchvision's own
float32 noise, measured in the same test), DDP semantics on 8 simulated devices (float64), bf16, NaNs.

The 8-device checks need XLA_FLAGS and 64-bit JAX set before anything runs, so they run in a subprocess
(`python -m tests.test_train_step`), started when this module's tests start so that its compiles overlap the
torch parity tests'.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ssdlite_jax import optim, porting
from ssdlite_jax.rcnn.configs import fasterrcnn_mobilenet_v3_large_320_fpn_config
from ssdlite_jax.zoo import build_model
from ssdlite_jax.ssd.configs import ssdlite320_config
from ssdlite_jax.distributed import AXIS, make_mesh, shard_batch
from ssdlite_jax.train_step import create_train_state, make_train_step
from tests.helpers import (QUICK_COMPILE_OPTIONS, REPO, assert_same_update, import_or_skip, subprocess_env,
                           tiny_model_config)
from tests.torch_reference import (random_torchvision_ssdlite, smooth_images, state_dict_numpy, to_nchw,
                                   with_exact_hardsigmoid)

NUM_DEVICES = 8
# Up to 3 GT boxes per image (xyxy px of a 320 input) with COCO labels; [0, 0, 0, 0] rows are padding.
BOXES = np.array([[[12, 20, 140, 200], [150, 60, 310, 250], [40, 230, 120, 315]],
                  [[100, 90, 220, 180], [5, 5, 300, 310], [0, 0, 0, 0]]], np.float32)
LABELS = np.array([[1, 18, 62], [3, 44, 0]], np.int32)
MASK = LABELS > 0
pytestmark = pytest.mark.slow  # full-model compiles, and the 8-device subprocess


def _optim_config():
  """The recipe's SGD at its full LR 0.15 (no warmup), so one step moves the weights visibly."""
  config = optim.default_optim_config()
  config.warmup_iters = 0
  return config


def _batch(images, boxes, labels, mask):
  n = len(images)
  return dict(image=images, boxes=boxes, labels=labels, mask=mask,
              image_id=np.arange(n, dtype=np.int32), orig_size=np.full((n, 2), 320, np.int32))


def _small_config(dtype="float32"):
  """The tiny model with COCO's 91 classes (the GT labels go up to 62)."""
  return tiny_model_config(num_classes=91, dtype=dtype)


def _small_batch(n, seed=0, dtype=np.float32):
  """n images of 128 px with the same two GT boxes each, so every image has as many positives."""
  boxes = np.tile(np.array([[10, 12, 70, 90], [50, 40, 124, 110], [0, 0, 0, 0]], np.float32), (n, 1, 1))
  labels = np.tile(np.array([1, 18, 0], np.int32), (n, 1))
  return _batch(smooth_images(n, 128, 128, seed).astype(dtype), boxes, labels, labels > 0)


@pytest.fixture(scope="module", autouse=True)
def multidevice_process():
  """The 8-device checks, running in the background while the other tests of this module run."""
  env = subprocess_env(NUM_DEVICES, quick_compile=True)
  proc = subprocess.Popen([sys.executable, "-m", "tests.test_train_step"], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  yield proc
  if proc.poll() is None:
    proc.kill()
    proc.wait()


# One SGD step from the same weights (torchvision's, ported), ours against torchvision's.
# float64 on both sides: no pre-activation lies within float64 rounding of a ReLU/ReLU6/hard-swish kink, so the two
# steps agree to float64 rounding, on any CPU. Measured on both depthwise paths: every tensor within 2.3e-10 of its
# own update (block 1's depthwise BN bias, whose gradient cancels heavily) and within 1.8e-13 of the largest update.
FLOAT64_UPDATE_RTOL, FLOAT64_NOISE_RTOL = 1e-9, 1e-12
# float32: every float32 step, torchvision's own included, differs from the float64 step by its rounding and by the
# few pre-activations that round to the other side of a kink (here 3 BN outputs in our forward and 5 in
# torchvision's cross 0, 6 or +-3 between float32 and float64; which ones depends on the CPU's summation order).
# A flipped ReLU input removes one term from the heavily cancelling BN-bias gradients upstream of it, so those
# tensors, and only those, move by up to hundreds of times the rounding floor.
# Per tensor, err = ||step - float64 step|| / ||float64 update||, and torchvision's float32 err is the floor.
# Measured ratios ours / floor, kernels 'cpu' and 'xla', AMD EPYC (AVX2) natively and with XLA limited to
# AVX and SSE4.2 (torch at its default ISA): median 1.02 / 1.02, 0.99 / 0.98, 1.00 / 0.99; worst tensor 85 / 85,
# 112 / 2.5, 526 / 21; 1 - cosine of the whole update 4.0e-8 / 4.0e-8 natively, 3.2e-6 / 1.8e-9 with SSE4.2.
FLOAT32_MEDIAN_RATIO = 1.5     # most tensors: as close to the exact step as torchvision's own float32 step
FLOAT32_MAX_RATIO = 2000.0     # every tensor: a few kink flips at most
FLOAT32_MAX_COSINE_GAP = 3e-5  # 1 - cos(our update, torchvision's float64 update) over all tensors


def _torch_sgd_step(dtype_name, images):
  """torchvision train mode from the seed-1 weights in `dtype_name`: one references/detection SGD step.

  Returns (losses, state_dict after the step as numpy)."""
  torch = import_or_skip("torch")
  dtype = getattr(torch, dtype_name)
  model = random_torchvision_ssdlite(seed=1).to(dtype).train()
  if dtype == torch.float64:
    with_exact_hardsigmoid(model)
  opt = torch.optim.SGD(model.parameters(), lr=0.15, momentum=0.9, weight_decay=4e-5)
  targets = [dict(boxes=torch.from_numpy(b[m]).to(dtype), labels=torch.from_numpy(c[m].astype(np.int64)))
             for b, c, m in zip(BOXES, LABELS, MASK)]
  losses = model(list(to_nchw(images).to(dtype)), targets)
  opt.zero_grad()
  sum(losses.values()).backward()
  opt.step()
  return {k: float(v.detach()) for k, v in losses.items()}, state_dict_numpy(model)


STEP_IMAGES = smooth_images(2, 320, 320, seed=3)


@pytest.fixture(scope="module")
def torch_steps():
  """(weights before, {"float32": (losses, weights after), "float64": ...}): torchvision's step in each dtype."""
  start = {k: v.copy() for k, v in state_dict_numpy(random_torchvision_ssdlite(seed=1)).items()}
  return start, {d: _torch_sgd_step(d, STEP_IMAGES) for d in ("float32", "float64")}


def _our_sgd_step(kernels, dtype, start):
  """Our full SSDlite320 step from the torchvision weights `start` in `dtype`: (detector, tx, mesh, compiled
  step, variables before, metrics, state_dict after)."""
  config = ssdlite320_config()
  config.kernels = kernels
  config.dtype = dtype
  det = build_model(config)
  tx, schedule = optim.make_optimizer(_optim_config(), steps_per_epoch=100)
  mesh = make_mesh(jax.devices()[:1])
  step = make_train_step(det, tx, schedule, mesh)
  cast = lambda v: v.astype(dtype) if v.dtype.kind == "f" else v
  variables = porting.torch_to_flax({k: cast(v) for k, v in start.items()}, det)
  state = create_train_state(det, tx, jax.random.key(0), mesh, variables)
  batch = _batch(STEP_IMAGES.astype(dtype), BOXES, LABELS, MASK)
  state, metrics = step(state, shard_batch(batch, mesh))
  assert bool(metrics["finite"]) and int(state.step) == 1
  np.testing.assert_allclose(metrics["lr"], 0.15, rtol=1e-7)
  after = porting.flax_to_torch(jax.device_get(state.variables), det)
  return det, tx, mesh, step, variables, jax.device_get(metrics), after


@pytest.fixture(scope="module")
def full_model(torch_steps):
  """Our float32 step on the full model with the CPU default's kernels ('cpu'). Both kernel paths' steps equal
  torchvision's in float64 (above); the float32 ratios below were measured on both."""
  return _our_sgd_step("cpu", "float32", torch_steps[0])


def _float_tensors(state_dict):
  return {k: np.asarray(v, np.float64) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}


def _assert_losses(metrics, torch_losses, rtol):
  for k in ("bbox_regression", "classification"):
    np.testing.assert_allclose(metrics[k], torch_losses[k], rtol=rtol, err_msg=k)
  np.testing.assert_allclose(metrics["loss"], sum(torch_losses.values()), rtol=rtol)


def _assert_counts(ours, want, start):
  for k in want:
    if k.endswith("num_batches_tracked"):
      assert ours[k].shape == want[k].shape == () and ours[k] == want[k] == start[k] + 1, k


@pytest.mark.torch
@pytest.mark.parametrize("kernels", ["cpu", "xla"])
def test_sgd_step_float64_matches_torchvision(torch_steps, kernels):
  start, torch_results = torch_steps
  torch_losses, want = torch_results["float64"]
  with jax.enable_x64(True):
    *_, metrics, ours = _our_sgd_step(kernels, "float64", start)
  _assert_losses(metrics, torch_losses, rtol=1e-12)
  _assert_counts(ours, want, start)
  assert {v.dtype for k, v in ours.items() if "num_batches" not in k} == {np.dtype(np.float64)}
  assert_same_update(_float_tensors(ours), _float_tensors(want), _float_tensors(start), FLOAT64_UPDATE_RTOL,
                      FLOAT64_NOISE_RTOL)


@pytest.mark.torch
def test_sgd_step_float32_within_torchvision_float32_noise(full_model, torch_steps):
  *_, metrics, ours = full_model
  start, torch_results = torch_steps
  torch_losses, exact = torch_results["float64"]
  _, torch32 = torch_results["float32"]
  _assert_losses(metrics, torch_losses, rtol=1e-5)
  _assert_counts(ours, exact, start)
  ours, torch32, exact, start = map(_float_tensors, (ours, torch32, exact, start))
  err = lambda got, k: np.linalg.norm(got[k] - exact[k]) / np.linalg.norm(exact[k] - start[k])
  ratio = {k: err(ours, k) / max(err(torch32, k), np.finfo(np.float32).eps) for k in exact}
  worst = sorted(ratio, key=ratio.get)[-5:]
  report = ", ".join(f"{k}: {ratio[k]:.3g}x ({err(ours, k):.2e} vs {err(torch32, k):.2e})" for k in worst)
  assert np.median(list(ratio.values())) <= FLOAT32_MEDIAN_RATIO, report
  assert max(ratio.values()) <= FLOAT32_MAX_RATIO, report
  flat = lambda d: np.concatenate([d[k].ravel() - start[k].ravel() for k in exact])
  a, b = flat(ours), flat(exact)
  assert 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) <= FLOAT32_MAX_COSINE_GAP


@pytest.mark.torch
def test_non_finite_batch_skips_the_update(full_model):
  det, tx, mesh, step, variables, *_ = full_model
  images = smooth_images(2, 320, 320, seed=4)
  images[1, 100:110, 50:60] = np.nan
  state = create_train_state(det, tx, jax.random.key(0), mesh, variables)
  before = jax.device_get(state)
  state, metrics = step(state, shard_batch(_batch(images, BOXES, LABELS, MASK), mesh))
  assert not bool(metrics["finite"])
  after = jax.device_get(state)
  assert int(after.step) == 0
  jax.tree.map(np.testing.assert_array_equal, (after.params, after.batch_stats, after.opt_state),
               (before.params, before.batch_stats, before.opt_state))


def test_bfloat16_step_keeps_float32_state():
  det = build_model(_small_config("bfloat16"))
  tx, schedule = optim.make_optimizer(_optim_config(), steps_per_epoch=100)
  mesh = make_mesh(jax.devices()[:1])
  state = create_train_state(det, tx, jax.random.key(0), mesh)
  batch = shard_batch(_small_batch(2), mesh)
  step = make_train_step(det, tx, schedule, mesh).lower(state, batch).compile(QUICK_COMPILE_OPTIONS)
  state, metrics = step(state, batch)
  metrics = jax.device_get(metrics)
  assert metrics["finite"] and metrics["num_positives"] > 0
  assert all(np.isfinite(v) for v in metrics.values())
  dtypes = lambda tree: {x.dtype for x in jax.tree.leaves(tree)}
  assert dtypes(state.params) == {jnp.dtype(jnp.float32)}
  # int32: optax's step count and BN's num_batches_tracked.
  assert dtypes(state.opt_state) == dtypes(state.batch_stats) == {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}


def test_data_parallel_step_on_8_devices(multidevice_process):
  out, _ = multidevice_process.communicate(timeout=600)
  assert multidevice_process.returncode == 0, out[-6000:]
  assert "multidevice checks passed" in out


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
