"""Model, anchors and post-processing against references that need no torch (torchvision's published figures,
hand-computed values, XLA's own convolutions), so that they also run on the current-JAX CI line."""

import math

import jax
import numpy as np
import pytest

from ssdlite_jax.ssd import postprocess
from ssdlite_jax.zoo import build_model
from ssdlite_jax.ssd.configs import ssdlite320_config, ssd300_vgg16_config, ssd512_resnet50_config, ssd512_vgg16_config
from ssdlite_jax.models import layers, vgg
from tests.helpers import tiny_model_config
from tests.torch_reference import smooth_images


def test_parameter_count_and_anchor_count_are_torchvision_published():
  """torchvision's model card: 3,440,060 parameters; 6 anchors on each cell of the 20, 10, 5, 3, 2, 1 maps."""
  det = build_model(ssdlite320_config())
  variables = jax.eval_shape(det.init, jax.random.key(0))
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(variables["params"])) == 3_440_060
  assert det.anchors.shape == (6 * (20 ** 2 + 10 ** 2 + 5 ** 2 + 3 ** 2 + 2 ** 2 + 1), 4) == (3234, 4)


@pytest.mark.parametrize("make_config, params, anchors", [
    (ssd300_vgg16_config, 35_641_826, 4 * 38 ** 2 + 6 * 19 ** 2 + 6 * 10 ** 2 + 6 * 5 ** 2 + 4 * 3 ** 2 + 4),
    (ssd512_vgg16_config, 37_075_166,
     4 * 64 ** 2 + 6 * 32 ** 2 + 6 * 16 ** 2 + 6 * 8 ** 2 + 4 * 6 ** 2 + 4 * 4 ** 2 + 4),
    (ssd512_resnet50_config, 42_704_482, 4 * 32 ** 2 + 6 * 16 ** 2 + 6 * 8 ** 2 + 6 * 4 ** 2 + 4 * 2 ** 2 + 4),
])
def test_ssd_family_parameter_and_anchor_counts(make_config, params, anchors):
  """SSD300: torchvision's model card (35,641,826; 8,732 anchors). SSD512-VGG16 and -ResNet50: the blog's 37.08 M
  and 42.70 M, on the 64, 32, 16, 8, 6, 4, 1 maps of torchvision's highres extractor and the 32..1 maps of the
  stride-16 ResNet50 trunk."""
  det = build_model(make_config())
  variables = jax.eval_shape(det.init, jax.random.key(0))
  assert (variables["batch_stats"] == {}) == (det.config.backbone == "vgg16")
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(variables["params"])) == params
  assert det.anchors.shape == (anchors, 4)


def test_vgg_pooling_and_l2norm_hand_computed():
  """pool3 in ceil mode takes 75 -> 38, the last window holding row/column 74 alone; pool5 (3x3, s1, p1) pads
  with -inf; L2Norm is 20 x / max(||x||, 1e-12) per pixel: 0 at an all-zero pixel, its gradient finite."""
  x = np.arange(75 * 75, dtype=np.float32).reshape(1, 75, 75, 1) - 3000.0
  y = np.asarray(layers.max_pool(x, 2, 2, ceil_mode=True))
  assert y.shape == (1, 38, 38, 1)
  assert y[0, 0, 0, 0] == x[0, 1, 1, 0] and y[0, 37, 37, 0] == x[0, 74, 74, 0] and y[0, 10, 37, 0] == x[0, 21, 74, 0]
  z = np.asarray(layers.max_pool(x, 3, 1, padding=1))
  assert z.shape == x.shape and z[0, 0, 0, 0] == x[0, 1, 1, 0]   # the corner's window is all negative inside
  norm = vgg.L2Norm()
  v = np.zeros((1, 2, 1, 3), np.float32)
  v[0, 0, 0] = [3.0, 0.0, 4.0]
  params = norm.init(jax.random.key(0), v)
  out = np.asarray(norm.apply(params, v))
  np.testing.assert_allclose(out[0, 0, 0], [12.0, 0.0, 16.0], rtol=1e-6)
  assert np.all(out[0, 1] == 0)
  # At the zero pixel the norm is clamped to 1e-12, so d out / d x = 20 / 1e-12 as in torch's F.normalize: not NaN.
  grad = np.asarray(jax.grad(lambda v: norm.apply(params, v).sum())(v))
  np.testing.assert_allclose(grad[0, 1], 20 / 1e-12, rtol=1e-6)
  # At (3, 0, 4): d/dx_i of sum_j 20 x_j / n = 20 (1 / n - x_i sum_j x_j / n^3), n = 5, sum_j x_j = 7.
  np.testing.assert_allclose(grad[0, 0, 0], 20 * (1 / 5 - np.array([3.0, 0.0, 4.0]) * 7 / 125), rtol=1e-5)


def test_anchors_hand_computed():
  """DefaultBoxGenerator([[2, 3]] * 6, min_ratio=0.2, max_ratio=0.95) at 320 px, worked out by hand: scales
  0.2, 0.35, ..., 0.95 and 1.0; per cell (s, s), (s', s') with s' = sqrt(s_k s_k+1), then (s sqrt(a), s / sqrt(a))
  and its transpose for a = 2, 3, each w/h clipped to 1; centres at (i + 0.5) / f of the image side."""
  anchors = build_model(ssdlite320_config()).anchors
  box = lambda cx, cy, w, h: [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
  s, s_next = 0.2, 0.35
  first_cell = [box(8, 8, 64, 64), box(8, 8, 320 * math.sqrt(s * s_next), 320 * math.sqrt(s * s_next)),
                box(8, 8, 64 * math.sqrt(2), 64 / math.sqrt(2)), box(8, 8, 64 / math.sqrt(2), 64 * math.sqrt(2)),
                box(8, 8, 64 * math.sqrt(3), 64 / math.sqrt(3)), box(8, 8, 64 / math.sqrt(3), 64 * math.sqrt(3))]
  np.testing.assert_allclose(anchors[:6], first_cell, rtol=1e-6, atol=1e-4)
  # Level 0, row 0, column 1 (x moves first): centre (24, 8).
  np.testing.assert_allclose(anchors[6], box(24, 8, 64, 64), atol=1e-4)
  # The 1 x 1 map: centre (160, 160), s = 0.95; 0.95 sqrt(2) > 1 is clipped to the whole width.
  last = [box(160, 160, 304, 304), box(160, 160, 320 * math.sqrt(0.95), 320 * math.sqrt(0.95)),
          box(160, 160, 320, 304 / math.sqrt(2)), box(160, 160, 304 / math.sqrt(2), 320),
          box(160, 160, 320, 304 / math.sqrt(3)), box(160, 160, 304 / math.sqrt(3), 320)]
  np.testing.assert_allclose(anchors[-6:], last, rtol=1e-6, atol=1e-4)


def test_cpu_kernels_equal_xla_convolutions():
  """The 'cpu' kernels (shift-and-add depthwise, batched-matmul pointwise, one-pass BN sums) against XLA's own
  convolutions, same weights, on a narrow model in train mode (batch statistics keep every map at unit scale,
  where eval mode with fresh running statistics shrinks the outputs to ~1e-18): every feature map, both heads
  and the new running statistics equal to float32 rounding."""
  outputs, variables = {}, None
  images = smooth_images(2, 128, 128, seed=2)
  for kernels in ("xla", "cpu"):
    det = build_model(tiny_model_config(kernels=kernels))
    if variables is None:   # one init (a compile of its own), the very same weights for both
      variables = det.init(jax.random.key(0))
    # One jitted program per kernels (run eagerly, the op-by-op dispatch of the shift-and-add depthwise took
    # minutes on 2 cores): the feature maps, and the heads with the new running statistics.
    run = jax.jit(lambda v, x: (det.module.apply(v, x, train=True, method="feature_maps", mutable=["batch_stats"])[0],
                                *det.module.apply(v, x, train=True, mutable=["batch_stats"])))
    outputs[kernels] = jax.device_get(run(variables, images))
  # Measured, AMD EPYC (AVX2): every tensor within 6.2e-5 of its largest value, but running means of zero-mean
  # features (BN after a BN'd linear conv), which are float32 rounding noise of ~3e-10 on both sides.
  for got, want in zip(jax.tree.leaves(outputs["cpu"]), jax.tree.leaves(outputs["xla"])):
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-4 * max(np.abs(want).max(), 1e-3))


def _logits(probabilities):
  """Class logits whose softmax is `probabilities` [A, K]."""
  return np.log(np.asarray(probabilities, np.float32))


def test_postprocess_hand_built():
  """Five anchors of a 100 x 100 input with zero regression (boxes = anchors), 3 classes + background, an
  original image of 200 (h) x 400 (w):
    anchors 0 and 1 overlap with IoU 0.82 > 0.55: class 1 keeps 0 (0.7), drops 1 (0.6);
    anchor 2 is far from them: class 1 keeps it (0.5);
    anchor 3 is anchor 0's box for class 2 (NMS is per class): kept (0.4);
    anchor 4's best class is 0.05, below score_thresh 0.1: nothing.
  Every anchor's other classes share its remaining probability and stay below the threshold."""
  anchors = np.array([[10, 10, 50, 50], [12, 12, 52, 52], [60, 60, 90, 90], [10, 10, 50, 50],
                      [0, 0, 100, 100]], np.float32)
  probs = np.array([[0.2, 0.7, 0.05, 0.05], [0.3, 0.6, 0.05, 0.05], [0.4, 0.5, 0.05, 0.05],
                    [0.5, 0.05, 0.4, 0.05], [0.85, 0.05, 0.05, 0.05]])
  out = jax.device_get(postprocess.postprocess(
      _logits(probs)[None], np.zeros((1, 5, 4), np.float32), anchors, np.array([[200, 400]]), (100, 100),
      score_thresh=0.1, nms_thresh=0.55, topk_candidates=5, detections_per_img=4))
  iou_01 = 40 * 40 / (40 * 40 + 40 * 40 - 38 * 38)
  assert iou_01 > 0.55
  scale = np.array([4, 2, 4, 2], np.float32)
  assert out["valid"][0].tolist() == [True, True, True, False]
  assert out["labels"][0].tolist() == [1, 1, 2, 0]
  np.testing.assert_allclose(out["scores"][0], [0.7, 0.5, 0.4, 0], rtol=1e-6)
  np.testing.assert_allclose(out["boxes"][0], [anchors[0] * scale, anchors[2] * scale, anchors[3] * scale,
                                               [0, 0, 0, 0]], rtol=1e-6)


@pytest.mark.parametrize("nms_thresh, kept", [(0.8, 2), (0.9, 3)])
def test_postprocess_nms_threshold_is_strict(nms_thresh, kept):
  """Three same-class boxes along a line, neighbours at IoU 90 / 110 = 0.82 and the outer
  two at 80 / 120 = 0.67: suppression at IoU > threshold, so 0.8 keeps the outer two and 0.9 keeps all three."""
  anchors = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [2, 0, 12, 10]], np.float32)
  probs = np.array([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7]])
  out = jax.device_get(postprocess.postprocess(
      _logits(probs)[None], np.zeros((1, 3, 4), np.float32), anchors, np.array([[10, 12]]), (10, 12),
      score_thresh=0.01, nms_thresh=nms_thresh, topk_candidates=3, detections_per_img=3))
  assert int(out["valid"][0].sum()) == kept
  np.testing.assert_allclose(out["scores"][0][:kept], [0.9, 0.7] if kept == 2 else [0.9, 0.8, 0.7], rtol=1e-6)


def test_equal_detectors_share_compiled_programs():
  """Detectors compare and hash by value (the config as built, kernels, BN axis name): a second Predictor of the
  same model reuses the first one's compiled program, and a later change to the caller's config object does not
  change a built detector."""
  from ssdlite_jax import detect, inference
  config = tiny_model_config()
  first = build_model(config)
  config.num_classes = 5   # after the build
  second, other = build_model(tiny_model_config()), build_model(config)
  assert first == second and hash(first) == hash(second) and first.config.num_classes == 4
  assert first != other and first != build_model(tiny_model_config(kernels="xla"))
  assert first != build_model(tiny_model_config(), bn_axis_name="data")
  variables = first.init(jax.random.key(0))
  image = (smooth_images(1, 100, 120, seed=0)[0] * 255).round().astype(np.uint8)
  programs = detect.detect_canvas._cache_size()
  got = inference.Predictor(first, variables)([image])[0]
  assert detect.detect_canvas._cache_size() == programs + 1
  again = inference.Predictor(second, variables)([image])[0]
  assert detect.detect_canvas._cache_size() == programs + 1   # no new program
  for key in ("boxes", "scores", "labels"):
    np.testing.assert_array_equal(again[key], got[key])
