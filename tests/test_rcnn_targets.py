"""Faster R-CNN's training targets: the Matcher against torchvision's (both of its settings, padded ground truth,
duplicate ground truth, a ground truth no candidate overlaps, none at all) and the balanced sampler's counts,
positive fraction and uniformity."""

import jax
import numpy as np
import pytest

from ssdlite_jax.rcnn import matcher
from tests.helpers import import_or_skip


def _case(seed, num_gt, num_candidates=300):
  rs = np.random.RandomState(seed)
  def boxes(n, spread):
    xy = rs.uniform(0, 300, (n, 2))
    wh = rs.uniform(8, spread, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
  gt = boxes(num_gt, 120)
  cand = np.concatenate([boxes(num_candidates - 2 * num_gt, 150),
                         gt + rs.uniform(-6, 6, gt.shape).astype(np.float32), gt])
  return gt, cand


@pytest.mark.torch
@pytest.mark.parametrize("high,low,low_quality", [(0.7, 0.3, True), (0.5, 0.5, False)])
@pytest.mark.parametrize("variant", ["random", "duplicate_gt", "isolated_gt", "no_gt"])
def test_match_equals_torchvision_with_padding(high, low, low_quality, variant):
  """Ours on the ground truth padded with zero boxes to 12 rows equals torchvision's Matcher on the unpadded
  ground truth (for no ground truth: torchvision's RPN and RoI heads take every candidate as background)."""
  torch = import_or_skip("torch")
  from torchvision.models.detection import _utils
  from torchvision.ops import box_iou
  gt, cand = _case(3, 5)
  if variant == "duplicate_gt":      # tied IoU rows: argmax ties go to the lower ground-truth index
    gt = np.concatenate([gt, gt[:2]])
  elif variant == "isolated_gt":     # overlaps no candidate: its best IoU is 0, shared by every candidate
    gt = np.concatenate([gt, np.array([[2000, 2000, 2010, 2010]], np.float32)])
  elif variant == "no_gt":
    gt = gt[:0]
  padded = np.zeros((12, 4), np.float32)
  padded[:len(gt)] = gt
  valid = np.arange(12) < len(gt)
  got = np.asarray(jax.jit(matcher.match, static_argnums=(3, 4, 5))(padded, valid, cand, high, low, low_quality))
  if len(gt):
    want = _utils.Matcher(high, low, low_quality)(box_iou(torch.from_numpy(gt), torch.from_numpy(cand))).numpy()
  else:
    want = np.full(len(cand), -1)
  np.testing.assert_array_equal(got, want)
  if variant == "random":   # the cases are what they say: some matched, some ignored, some background
    assert {-1, 0}.issubset(set(got.tolist())) and (got >= 0).sum() >= 5
    if high != low:
      assert (got == -2).any()


def test_padded_zero_boxes_would_match_everything_without_the_mask():
  """The trap the mask avoids: treated as real, a zero box's best IoU (0) is every candidate's IoU with it, so
  the low-quality step turns all the candidates below 0.3 into matches."""
  gt, cand = _case(4, 3)
  padded = np.concatenate([gt, np.zeros((2, 4), np.float32)])
  masked = np.asarray(matcher.match(padded, np.arange(5) < 3, cand, 0.7, 0.3, True))
  unmasked = np.asarray(matcher.match(padded, np.ones(5, bool), cand, 0.7, 0.3, True))
  assert (masked == -1).sum() > 100 and (unmasked == -1).sum() == 0


@pytest.mark.parametrize("num_pos,num_neg", [(300, 1000), (40, 1000), (40, 100), (0, 30), (0, 0)])
def test_balanced_sample_counts(num_pos, num_neg):
  """256 per image, half positive at most: min(#pos, 128) positives, min(#neg, 256 - those) negatives, only from
  their candidates (the rest of 1,400 are ignored ones)."""
  n = 1400
  positive = np.zeros(n, bool)
  negative = np.zeros(n, bool)
  idx = np.random.RandomState(0).permutation(n)
  positive[idx[:num_pos]] = True
  negative[idx[num_pos:num_pos + num_neg]] = True
  pos, neg = jax.jit(matcher.balanced_sample, static_argnums=(3, 4))(jax.random.key(0), positive, negative, 256, 0.5)
  pos, neg = np.asarray(pos), np.asarray(neg)
  want_pos = min(num_pos, 128)
  assert pos.sum() == want_pos and neg.sum() == min(num_neg, 256 - want_pos)
  assert not (pos & ~positive).any() and not (neg & ~negative).any()


def test_balanced_sample_is_uniform():
  """Over 2,000 draws, each of 40 positives (10 taken a draw) and 200 negatives (20 taken) is taken at its
  expected rate: every count within 5 standard deviations of the binomial mean, and the counts' spread that of
  a binomial (chi-square per degree of freedom within 0.6..1.5)."""
  positive = np.zeros(300, bool)
  negative = np.zeros(300, bool)
  positive[:40] = True
  negative[100:] = True
  keys = jax.random.split(jax.random.key(1), 2000)
  pos, neg = jax.jit(jax.vmap(lambda k: matcher.balanced_sample(k, positive, negative, 30, 1 / 3)))(keys)
  for counts, candidates, taken in ((np.asarray(pos).sum(0)[:40], 40, 10), (np.asarray(neg).sum(0)[100:], 200, 20)):
    p = taken / candidates
    mean, var = 2000 * p, 2000 * p * (1 - p)
    assert np.abs(counts - mean).max() < 5 * np.sqrt(var)
    assert 0.6 < ((counts - mean) ** 2 / var).mean() < 1.5
