"""Augmentation invariants, and RandomIoUCrop's distribution against torchvision's transforms.v2.RandomIoUCrop."""

import numpy as np
import pytest
import tensorflow as tf
from tests.helpers import import_or_skip
from scipy import stats

from ssdlite_jax.data import augment

pytestmark = pytest.mark.tf  # imports TensorFlow

H, W = 480, 640
BOXES = np.asarray([[50, 60, 250, 300], [300, 100, 620, 460], [10, 400, 90, 470], [400, 20, 460, 80]], np.float32)
LABELS = np.asarray([1, 2, 3, 1], np.int32)
IMAGE = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
N_DIST = 1500  # samples per implementation for the distribution test


def _seed(i):
  return tf.constant([7, i], tf.int64)


@tf.function
def _crop(image, boxes, labels, seed):
  shape = tf.shape(image)
  window = augment.iou_crop_window(shape[0], shape[1], boxes, seed)
  out = augment.random_iou_crop({"image": image, "boxes": boxes, "labels": labels}, seed)
  return window, (out["image"], out["boxes"], out["labels"])


def test_iou_crop_invariants():
  for i in range(60):
    (top, left, ch, cw, keep), (image, boxes, labels) = (
      tf.nest.map_structure(np.asarray, _crop(IMAGE, BOXES, LABELS, _seed(i))))
    assert image.shape == (ch, cw, 3)
    np.testing.assert_array_equal(image, IMAGE[top:top + ch, left:left + cw])
    if (ch, cw) == (H, W):
      np.testing.assert_array_equal(boxes, BOXES)
      continue
    assert 0.3 * H - 1 <= ch <= H and 0.3 * W - 1 <= cw <= W and 0.5 <= cw / ch <= 2
    cx, cy = BOXES[:, [0, 2]].mean(1), BOXES[:, [1, 3]].mean(1)
    inside = (left < cx) & (cx < left + cw) & (top < cy) & (cy < top + ch)
    np.testing.assert_array_equal(keep, inside)
    assert keep.any()
    np.testing.assert_array_equal(labels, LABELS[keep])
    expected = np.clip(BOXES[keep] - [left, top, left, top], 0, [cw, ch, cw, ch])
    np.testing.assert_allclose(boxes, expected)
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_iou_crop_without_boxes_returns_whole_image():
  (top, left, ch, cw, _), _ = _crop(IMAGE, np.zeros((0, 4), np.float32), np.zeros((0,), np.int32), _seed(3))
  assert (int(top), int(left), int(ch), int(cw)) == (0, 0, H, W)


def test_horizontal_flip_symmetry():
  flips = 0
  for i in range(20):
    out = augment.random_horizontal_flip({"image": tf.constant(IMAGE), "boxes": tf.constant(BOXES)}, _seed(i))
    image, boxes = out["image"].numpy(), out["boxes"].numpy()
    if np.array_equal(image, IMAGE):
      np.testing.assert_array_equal(boxes, BOXES)
    else:
      flips += 1
      np.testing.assert_array_equal(image, IMAGE[:, ::-1])
      np.testing.assert_array_equal(boxes[:, [2, 1, 0, 3]] * [-1, 1, -1, 1] + [W, 0, W, 0], BOXES)
  assert 3 <= flips <= 17


@pytest.mark.parametrize("kind", ["ssdlite", "ssd", "none"])
def test_presets_keep_boxes_in_the_model_frame(kind):
  example = {"image": tf.constant(IMAGE), "boxes": tf.constant(BOXES), "labels": tf.constant(LABELS)}
  fn = tf.function(lambda s: augment.augment(example, s, kind, (320, 320)))
  for i in range(15):
    out = fn(_seed(i))
    image, boxes, labels = (out[k].numpy() for k in ("image", "boxes", "labels"))
    assert image.shape == (320, 320, 3) and image.dtype == np.float32
    assert 0 <= image.min() and image.max() <= 1
    assert ((boxes >= 0) & (boxes <= 320 * (1 + 1e-6))).all()  # float32 ratio, as torchvision
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert set(labels) <= set(LABELS) and len(labels) == len(boxes) >= 1
  if kind == "none":
    np.testing.assert_allclose(boxes, BOXES * [0.5, 2 / 3, 0.5, 2 / 3], rtol=1e-6)


def test_zoom_out_geometry():
  for i in range(10):
    out = augment.random_zoom_out({"image": tf.constant(IMAGE), "boxes": tf.constant(BOXES)}, _seed(i))
    image, boxes = out["image"].numpy(), out["boxes"].numpy()
    assert H <= image.shape[0] <= 4 * H and W <= image.shape[1] <= 4 * W
    left, top = boxes[0, 0] - BOXES[0, 0], boxes[0, 1] - BOXES[0, 1]
    np.testing.assert_allclose(image[int(top):int(top) + H, int(left):int(left) + W] * 255, IMAGE, atol=1e-3)
    if image.shape != IMAGE.shape:
      np.testing.assert_allclose(image[0, 0] if top or left else image[-1, -1], np.array([123, 117, 104]) / 255,
                                 atol=1e-6)


def _categories(crop_sizes):
  """Category per sample: 0 = no crop, 1..4 = crop width fraction quartile bins of [0.3, 1]."""
  sizes = np.asarray(crop_sizes, np.float64)
  no_crop = (sizes[:, 0] == H) & (sizes[:, 1] == W)
  bins = np.digitize(sizes[:, 1] / W, [0.475, 0.65, 0.825]) + 1
  return np.where(no_crop, 0, bins)


def test_iou_crop_distribution_matches_torchvision():
  torch = import_or_skip("torch")
  tv = import_or_skip("torchvision")
  from torchvision.transforms import v2
  torch.manual_seed(0)
  crop = v2.RandomIoUCrop()
  image = tv.tv_tensors.Image(torch.zeros(3, H, W, dtype=torch.uint8))
  target = {"boxes": tv.tv_tensors.BoundingBoxes(torch.from_numpy(BOXES), format="XYXY", canvas_size=(H, W)),
            "labels": torch.from_numpy(LABELS)}
  theirs = [tuple(crop(image, target)[0].shape[-2:]) for _ in range(N_DIST)]

  ds = tf.data.Dataset.range(N_DIST).map(
    lambda i: tf.stack(augment.iou_crop_window(H, W, BOXES, tf.stack([tf.constant(1, tf.int64), i]))[2:4]))
  ours = [tuple(x) for x in ds.as_numpy_iterator()]

  a, b = np.bincount(_categories(theirs), minlength=5), np.bincount(_categories(ours), minlength=5)
  _, p, _, _ = stats.chi2_contingency(np.stack([a, b]))
  assert p > 1e-3, (a, b)
  # "No crop" is option 1.0 (1/7 per round) plus rounds that never fail here: about 1/7.
  assert abs(b[0] / N_DIST - a[0] / N_DIST) < 4 * np.sqrt(2 * (1 / 7) * (6 / 7) / N_DIST)
