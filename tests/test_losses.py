"""Matching and multibox loss: parity with torchvision's SSDMatcher and SSD.compute_loss (marked torch), and
hand-worked cases."""

import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssdlite_jax.ssd import anchors as anchors_lib
from ssdlite_jax.ssd.losses import multibox_loss
from ssdlite_jax.ssd.matcher import match_anchors
from tests.helpers import import_or_skip

ANCHORS = anchors_lib.default_boxes([(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)], (320, 320),
                                    [[2, 3]] * 6, 0.2, 0.95)
NUM_ANCHORS = ANCHORS.shape[0]          # 3234
MAX_BOXES = 1100                        # every case is padded to this many GT slots
NUM_CLASSES = 91


def _pad(boxes, labels, valid=None):
  """Case arrays padded to MAX_BOXES; padding slots hold anchor copies that must be ignored."""
  n = len(boxes)
  valid = np.ones(n, bool) if valid is None else np.asarray(valid)
  out_boxes = ANCHORS[7:7 + MAX_BOXES].copy()
  out_labels = np.full(MAX_BOXES, 5, np.int32)
  out_boxes[:n], out_labels[:n] = boxes, labels
  mask = np.zeros(MAX_BOXES, bool)
  mask[:n] = valid
  return out_boxes.astype(np.float32), out_labels, mask


def _random_boxes(rng, n):
  centers = rng.uniform(0, 320, size=(n, 2))
  sizes = rng.uniform(8, 250, size=(n, 2))
  return np.clip(np.concatenate([centers - sizes / 2, centers + sizes / 2], 1), 0, 320)


def _jittered_anchors(rng, anchors):
  """Anchor copies moved by up to 0.5 px, so cases test edge rules rather than one-ulp ties."""
  return anchors + rng.uniform(-0.5, 0.5, anchors.shape).astype(np.float32)


def _iou_half_gt():
  """A GT whose torch IoU with some anchor is exactly 0.5 while its best anchor is another one."""
  torch = import_or_skip("torch")
  from torchvision.ops import boxes as box_ops
  gt = ANCHORS[:600].copy()
  gt[:, 2] = gt[:, 0] + 2 * (gt[:, 2] - gt[:, 0])
  iou = box_ops.box_iou(torch.tensor(gt), torch.tensor(ANCHORS)).numpy()
  rows = np.arange(600)
  i = np.flatnonzero((iou[rows, rows] == 0.5) & (iou.argmax(1) != rows))[0]
  return gt[i:i + 1], i


def _case(name):
  """(boxes [MAX_BOXES, 4], labels, mask) for one named situation."""
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  if name == "random":
    return _pad(_random_boxes(rng, 7), rng.integers(1, NUM_CLASSES, 7))
  if name == "no_boxes":
    return _pad(np.zeros((0, 4)), np.zeros(0))
  if name == "padded_interleaved":
    valid = np.array([True, False, True, False, False, True, True])
    boxes = _random_boxes(rng, 7)
    boxes[~valid] = ANCHORS[[0, 100, 3000]]           # would be forced matches if not masked
    return _pad(boxes, rng.integers(1, NUM_CLASSES, 7), valid)
  if name == "shared_best_anchor":
    # GT0 is anchor 0 exactly, GT1 a shifted copy with the same best anchor: GT1 takes it.
    # GT2 == GT3 (duplicates): the per-anchor step picks GT2, the forced step GT3.
    # GT4, GT5: small boxes (all IoUs < 0.5) with one best anchor: GT4 ends up with no anchor.
    boxes = np.stack([ANCHORS[0], ANCHORS[0] + np.float32(3.0), ANCHORS[500], ANCHORS[500],
                      [100, 100, 110, 110], [100, 100, 111, 111]])
    return _pad(boxes, [3, 4, 7, 9, 30, 31])
  if name == "no_overlap":
    boxes = np.array([[2000, 2000, 2010, 2012], [40, 50, 120, 180]], np.float32)
    return _pad(boxes, [11, 12])
  if name == "iou_half":
    return _pad(_iou_half_gt()[0], [21])
  if name == "many_positives_all":   # 3·|P| >= A: every positive is counted twice
    return _pad(_jittered_anchors(rng, ANCHORS[:2200:2]), rng.integers(1, NUM_CLASSES, 1100))
  if name == "many_positives_some":  # |P| > A / 4 but 3·|P| < A: some positives are counted twice
    return _pad(_jittered_anchors(rng, ANCHORS[:1200:4]), np.full(300, 17))
  raise ValueError(name)


CASES = ["random", "no_boxes", "padded_interleaved", "shared_best_anchor", "no_overlap", "iou_half",
         "many_positives_all", "many_positives_some"]


def _torch_matches(boxes, mask):
  """torchvision's matched_idxs as SSD.forward computes them, mapped back to padded slot indices."""
  torch = import_or_skip("torch")
  import_or_skip("torchvision")
  from torchvision.models.detection import _utils as det_utils
  from torchvision.ops import boxes as box_ops
  slots = np.flatnonzero(mask)
  if slots.size == 0:
    return np.full(NUM_ANCHORS, -1)
  iou = box_ops.box_iou(torch.tensor(boxes[slots]), torch.tensor(ANCHORS))
  matched = det_utils.SSDMatcher(0.5)(iou).numpy()
  return np.where(matched >= 0, slots[np.maximum(matched, 0)], -1)


def _torch_loss(logits, regression, boxes, labels, mask):
  """SSD.compute_loss with a stub self: (bbox, cls, d logits, d regression) of bbox + cls."""
  torch = import_or_skip("torch")
  import_or_skip("torchvision")
  from torchvision.models.detection import _utils as det_utils
  from torchvision.models.detection.ssd import SSD
  targets, matched = [], []
  for b in range(len(boxes)):
    targets.append({"boxes": torch.tensor(boxes[b][mask[b]]),
                    "labels": torch.tensor(labels[b][mask[b]], dtype=torch.int64)})
    slot_matches = _torch_matches(boxes[b], mask[b])
    rank = np.cumsum(mask[b]) - 1                 # padded slot -> index among the valid boxes
    matched.append(torch.tensor(np.where(slot_matches >= 0, rank[slot_matches], -1)))
  stub = types.SimpleNamespace(box_coder=det_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)),
                               neg_to_pos_ratio=3.0)
  logits_t = torch.tensor(logits, requires_grad=True)
  regression_t = torch.tensor(regression, requires_grad=True)
  losses = SSD.compute_loss(stub, targets, {"cls_logits": logits_t, "bbox_regression": regression_t},
                            [torch.tensor(ANCHORS)] * len(boxes), matched)
  (losses["bbox_regression"] + losses["classification"]).backward()
  return (losses["bbox_regression"].item(), losses["classification"].item(),
          logits_t.grad.numpy(), regression_t.grad.numpy())


def _total_loss(logits, regression, boxes, labels, mask):
  out = multibox_loss(logits, regression, ANCHORS, boxes, labels, mask)
  return out["bbox_regression"] + out["classification"], out


@pytest.fixture(scope="module")
def jax_loss():
  return jax.jit(jax.value_and_grad(_total_loss, argnums=(0, 1), has_aux=True))


@pytest.fixture(scope="module")
def jax_match():
  return jax.jit(match_anchors)


def _inputs(names, seed=0):
  """Batch of the named cases, with random head outputs; positives of 'many_positives_some' share
  one logit row so that torch's arbitrary choice of which to count twice cannot matter."""
  rng = np.random.default_rng(seed)
  boxes, labels, mask = map(np.stack, zip(*[_case(n) for n in names]))
  logits = rng.normal(0, 2, size=(len(names), NUM_ANCHORS, NUM_CLASSES)).astype(np.float32)
  regression = rng.normal(0, 1, size=(len(names), NUM_ANCHORS, 4)).astype(np.float32)
  exact = np.ones((len(names), NUM_ANCHORS), bool)
  for b, name in enumerate(names):
    if name == "many_positives_some":
      positive = _torch_matches(boxes[b], mask[b]) >= 0
      logits[b, positive] = logits[b, 0]
      exact[b] = ~positive
  return (logits, regression, boxes, labels, mask), exact


def _check_against_torch(jax_loss, names):
  args, exact = _inputs(names)
  want_box, want_cls, want_dlogits, want_dreg = _torch_loss(*args)
  (_, out), (dlogits, dreg) = jax_loss(*map(jnp.asarray, args))
  assert float(out["bbox_regression"]) == pytest.approx(want_box, rel=1e-5, abs=1e-7)
  assert float(out["classification"]) == pytest.approx(want_cls, rel=1e-5, abs=1e-7)
  dlogits, dreg = np.asarray(dlogits), np.asarray(dreg)
  scale = np.abs(want_dlogits).max() + 1e-12
  np.testing.assert_allclose(dlogits[exact], want_dlogits[exact], rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(dlogits[~exact].sum(0), want_dlogits[~exact].sum(0),
                             rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(dreg, want_dreg, rtol=1e-5, atol=1e-5 * np.abs(want_dreg).max())
  return out


@pytest.mark.torch
@pytest.mark.parametrize("name", CASES)
def test_match_anchors_matches_torchvision(jax_match, name):
  boxes, _, mask = _case(name)
  np.testing.assert_array_equal(np.asarray(jax_match(boxes, mask, ANCHORS)),
                                _torch_matches(boxes, mask))


@pytest.mark.torch
def test_match_anchors_ulp_ties_bitwise(jax_match):
  boxes, _, mask = _pad(ANCHORS[:1200:4], np.full(300, 17))   # exact anchor copies: IoUs 1 ulp apart
  np.testing.assert_array_equal(np.asarray(jax_match(boxes, mask, ANCHORS)),
                                _torch_matches(boxes, mask))


@pytest.mark.torch
def test_cases_exercise_the_edges():
  """Each edge case really shows the behaviour it is named after (in torchvision's own matcher)."""
  m = _torch_matches(*_case("shared_best_anchor")[::2])
  assert m[0] == 1                                     # GT0 (IoU 1) lost its best anchor to GT1
  assert m[500] == 3 and 2 in m                        # duplicates: forced to the later, rest to the first
  assert 5 in m and 4 not in m                         # GT4 lost its only anchor to GT5
  assert _torch_matches(*_case("no_overlap")[::2])[0] == 0
  _, anchor = _iou_half_gt()
  assert _torch_matches(*_case("iou_half")[::2])[anchor] == 0
  assert np.all(_torch_matches(*_case("no_boxes")[::2]) == -1)
  assert (_torch_matches(*_case("many_positives_all")[::2]) >= 0).sum() * 3 >= NUM_ANCHORS
  some = (_torch_matches(*_case("many_positives_some")[::2]) >= 0).sum()
  assert 3 * some > NUM_ANCHORS - some and 3 * some < NUM_ANCHORS


@pytest.mark.torch
@pytest.mark.parametrize("name", CASES)
def test_multibox_loss_matches_torchvision(jax_loss, name):
  out = _check_against_torch(jax_loss, [name, "random"])
  assert float(out["num_positives"]) == sum(
      (_torch_matches(*_case(n)[::2]) >= 0).sum() for n in [name, "random"])


@pytest.mark.torch
def test_multibox_loss_whole_batch(jax_loss):
  """All cases in one batch: N is summed over the batch before normalising."""
  _check_against_torch(jax_loss, CASES)


def test_no_boxes_anywhere_gives_zero_loss(jax_loss):
  args, _ = _inputs(["no_boxes", "no_boxes"])
  (total, out), (dlogits, dreg) = jax_loss(*map(jnp.asarray, args))
  assert float(total) == 0.0 and float(out["num_positives"]) == 0.0
  assert not np.any(np.asarray(dlogits)) and not np.any(np.asarray(dreg))


def test_bfloat16_logits_computed_in_float32(jax_loss):
  (logits, regression, boxes, labels, mask), _ = _inputs(["random", "padded_interleaved"])
  logits = jnp.asarray(logits, jnp.bfloat16)
  low = jax.jit(multibox_loss)(logits, regression, ANCHORS, boxes, labels, mask)
  (_, full), _ = jax_loss(logits.astype(jnp.float32), regression, boxes, labels, mask)
  assert low["classification"].dtype == jnp.float32
  assert float(low["classification"]) == pytest.approx(float(full["classification"]), rel=1e-6)


# Hand-worked cases (no torch): five anchors, xyxy px.
HAND_ANCHORS = np.array([[0, 0, 10, 10], [0, 0, 20, 20], [30, 30, 40, 40], [100, 100, 110, 110],
                         [0, 0, 20, 10]], np.float32)


def test_match_anchors_hand_computed():
  """GT 0 = anchor 0 (IoU 1; anchor 1: 100 / 400 = 0.25, unmatched; anchor 4: 100 / 200 = 0.5, matched at
  exactly the threshold); GT 1 is anchor 2 shifted by 1 px (90 / 110 = 0.82); GT 2 covers 16 / 100 = 0.16 of
  anchor 3, below 0.5, but is forced onto its best anchor; slot 3 is padding on top of anchor 0."""
  gt = np.array([[0, 0, 10, 10], [31, 30, 41, 40], [100, 100, 104, 104], [0, 0, 10, 10]], np.float32)
  mask = np.array([True, True, True, False])
  assert match_anchors(gt, mask, HAND_ANCHORS).tolist() == [0, -1, 1, 2, 0]
  assert match_anchors(gt, np.zeros(4, bool), HAND_ANCHORS).tolist() == [-1] * 5


def test_multibox_loss_hand_computed():
  """One GT [0, 0, 10, 12] of class 1 on five anchors: anchor 0 (IoU 100 / 120) is the one positive (anchor 4:
  100 / 220, anchor 1: 120 / 400). Box target of anchor 0, weights (10, 10, 5, 5): (0, 10 * 1 / 10, 0,
  5 log 1.2). CE of the positive plus the 3 hardest of the 4 negatives, each summed and divided by N = 1."""
  boxes = np.array([[[0, 0, 10, 12], [0, 0, 0, 0]]], np.float32)
  labels, mask = np.array([[1, 0]], np.int32), np.array([[True, False]])
  fg_logit = np.array([1.0, 2.0, 1.5, -1.0, 3.0], np.float32)      # class-1 logit per anchor; background 0
  logits = np.stack([np.zeros(5, np.float32), fg_logit], axis=-1)[None]
  target = np.array([0, 1, 0, 5 * np.log(1.2)])
  offsets = np.array([0.5, -2.0, 0.1, 0.0])                          # |x| < 1 twice, |x| > 1 once, 0
  regression = np.full((1, 5, 4), 7.0, np.float32)                    # ignored on the negatives
  regression[0, 0] = target + offsets
  out = multibox_loss(logits, regression, HAND_ANCHORS, boxes, labels, mask)
  log_sum_exp = np.log(1 + np.exp(fg_logit.astype(np.float64)))
  ce_positive = log_sum_exp[0] - fg_logit[0]
  ce_negatives = np.sort(log_sum_exp[1:])[::-1][:3]                  # anchors 4, 1, 2
  assert float(out["num_positives"]) == 1.0
  np.testing.assert_allclose(out["classification"], ce_positive + ce_negatives.sum(), rtol=1e-6)
  np.testing.assert_allclose(out["bbox_regression"], 0.5 * 0.5 ** 2 + (2.0 - 0.5) + 0.5 * 0.1 ** 2 + 0,
                             rtol=1e-6)
