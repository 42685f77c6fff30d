"""Inputs built where a detection selection breaks, for postprocess.select and each export format's copy of it
(tests/test_export_selection.py, tests/test_export_onnx.py): decoded boxes [A, 4] xyxy model px and class logits
[A, K], float32, numpy only (the ONNX venv has neither torch nor TensorFlow)."""

import functools

import jax
import ml_collections
import numpy as np

from ssdlite_jax.ssd import postprocess

SIZE = 320   # the model input side the boxes are clipped to

# (num_classes, anchors, nms_thresh, topk_candidates, detections_per_img): few classes and many; k capped by the
# anchors; D below, at and above what survives; SSDlite's 0.55 (float32(0.55) > 0.55), SSD300's 0.45 and 0.5
# (exact in float32).
CONFIGS = {
    "2_classes": (2, 400, 0.55, 300, 300),
    "11_classes": (11, 240, 0.45, 300, 100),
    "91_classes": (91, 600, 0.5, 300, 300),
}


def config(name):
  """The selection settings of CONFIGS[name] as the fields of a model config that select() reads."""
  num_classes, _, nms_thresh, topk, d = CONFIGS[name]
  return ml_collections.ConfigDict({"num_classes": num_classes, "score_thresh": 0.001, "nms_thresh": nms_thresh,
                                    "topk_candidates": topk, "detections_per_img": d})


def _random_boxes(rng, n, lo=-40.0, hi=SIZE + 40.0):
  """n boxes [n, 4] xyxy, up to 40 px outside the image before clipping, as decoded boxes are."""
  centre = rng.uniform(lo, hi, (n, 2))
  half = rng.uniform(2.0, 90.0, (n, 2))
  return np.clip(np.concatenate([centre - half, centre + half], 1), 0.0, SIZE).astype(np.float32)


def _iou_tie_pairs(nms_thresh, n):
  """n pairs of boxes whose float32 IoU is exactly float32(nms_thresh): a 20 x 1 box and one of width
  20 * nms_thresh (a whole number here) inside it, at whole-pixel offsets."""
  inner = 20.0 * nms_thresh
  assert inner == round(inner), nms_thresh
  pairs = []
  for i in range(n):
    x, y = 5.0 + 25.0 * (i % 12), 5.0 + 7.0 * (i // 12)
    pairs += [[x, y, x + 20.0, y + 1.0], [x, y, x + inner, y + 1.0]]
  boxes = np.array(pairs, np.float32)
  iou = np.float32(inner) / np.float32(20.0)
  assert iou == np.float32(nms_thresh), iou
  return boxes


def cases(name, seed=0):
  """{case: (boxes [A, 4], logits [A, K])} for CONFIGS[name]:

  random            boxes anywhere, clipped; logits N(0, 3)
  zero_area         a third of the boxes collapsed onto each border (zero width at x = 0 and x = S, zero height
                    at y = 0 and y = S, corners: both) and inside, scored highest in several classes
  same_boxes        groups of anchors with identical coordinates and logits (IoU 1, tied scores) and one box
                    scored high in every class
  iou_ties          pairs at IoU exactly float32(nms_thresh), the higher score on either box
  score_ties        chains of overlapping boxes with identical logits: which one NMS keeps is the tie rule
  few               fewer detections above score_thresh than D (the rest at about 1e-9)
  none              nothing above score_thresh
  """
  num_classes, num_anchors, nms_thresh, _, _ = CONFIGS[name]
  rng = np.random.RandomState(seed)
  k = num_classes
  out = {}

  boxes, logits = _random_boxes(rng, num_anchors), rng.normal(0.0, 3.0, (num_anchors, k)).astype(np.float32)
  out["random"] = (boxes, logits)

  boxes = _random_boxes(rng, num_anchors)
  logits = rng.normal(0.0, 3.0, (num_anchors, k)).astype(np.float32)
  degenerate = rng.rand(num_anchors) < 1 / 3
  for i in np.flatnonzero(degenerate):
    side = rng.randint(6)
    if side == 0:
      boxes[i, [0, 2]] = 0.0                    # left border: zero width
    elif side == 1:
      boxes[i, [0, 2]] = SIZE                   # right border
    elif side == 2:
      boxes[i, [1, 3]] = 0.0                    # top: zero height
    elif side == 3:
      boxes[i, [1, 3]] = SIZE                   # bottom, as [0, 320, 57.6, 320]
    elif side == 4:
      boxes[i] = [SIZE, SIZE, SIZE, SIZE]       # a corner: both
    else:
      boxes[i, 2] = boxes[i, 0]                 # inside
    logits[i, 1 + rng.choice(k - 1, min(3, k - 1), replace=False)] += 8.0
  out["zero_area"] = (boxes, logits)

  boxes = _random_boxes(rng, num_anchors)
  logits = rng.normal(0.0, 3.0, (num_anchors, k)).astype(np.float32)
  for g in range(min(20, num_anchors // 10)):
    members = rng.choice(num_anchors, 4, replace=False)
    boxes[members] = boxes[members[0]]
    logits[members] = logits[members[0]]
  logits[0] = 0.0
  logits[0, 0] = -5.0                          # box 0: the same score in every foreground class
  out["same_boxes"] = (boxes, logits)

  pairs = _iou_tie_pairs(nms_thresh, min(24, num_anchors // 4))
  boxes = _random_boxes(rng, num_anchors)
  boxes[:len(pairs)] = pairs
  logits = rng.normal(0.0, 3.0, (num_anchors, k)).astype(np.float32)
  logits[:len(pairs), 1:] += 6.0
  out["iou_ties"] = (boxes, logits)

  boxes = _random_boxes(rng, num_anchors)
  logits = rng.normal(0.0, 3.0, (num_anchors, k)).astype(np.float32)
  row = rng.normal(0.0, 3.0, k).astype(np.float32)
  for chain in range(min(10, num_anchors // 12)):
    x, y = rng.uniform(0, SIZE - 80, 2)
    for j in range(6):   # shifted by 4 px along x: consecutive boxes overlap at IoU 0.9
      a = chain * 6 + j
      boxes[a] = [x + 4 * j, y, x + 4 * j + 40, y + 40]
      logits[a] = row
  out["score_ties"] = (boxes, logits)

  boxes = _random_boxes(rng, num_anchors)
  logits = np.zeros((num_anchors, k), np.float32)
  logits[:, 0] = 25.0                          # foreground scores ~1e-11: below 0.001
  few = rng.choice(num_anchors, 7, replace=False)
  logits[few, 1 + rng.randint(k - 1, size=7)] = 27.0
  out["few"] = (boxes, logits)
  logits = np.zeros((num_anchors, k), np.float32)
  logits[:, 0] = 25.0
  out["none"] = (boxes, logits)
  return out


CASES = {name: cases(name) for name in CONFIGS}


@functools.lru_cache(maxsize=None)
def _jitted_select(name):
  """postprocess.select jitted with CONFIGS[name]'s settings."""
  cfg = config(name)
  return jax.jit(functools.partial(postprocess.select, score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh,
                                   topk_candidates=cfg.topk_candidates, detections_per_img=cfg.detections_per_img))


def predictor_selection(name, case):
  """postprocess.select on CASES[name][case]."""
  boxes, logits = CASES[name][case]
  return jax.device_get(_jitted_select(name)(boxes, logits))


def assert_same_selection(got, want, context, rtol=2e-6):
  """got, want: dicts of boxes [D, 4] model px, labels [D], scores [D], valid [D]: the same valid count, the same
  detections one to one (label and box exact, scores to float32 rounding: each runtime has its own exp), in the
  same order up to scores equal to that rounding, which the runtimes may order either way."""
  n = int(want["valid"].sum())
  assert int(got["valid"].sum()) == n, context
  assert got["valid"][:n].all() and not got["valid"][n:].any(), context
  assert not got["scores"][n:].any() and not got["boxes"][n:].any() and not got["labels"][n:].any(), context
  tol = lambda s: rtol * np.abs(s) + 1e-9
  np.testing.assert_allclose(got["scores"][:n], want["scores"][:n], rtol=rtol, atol=1e-9, err_msg=context)
  unmatched = {}
  for j in range(n):
    unmatched.setdefault((int(want["labels"][j]), want["boxes"][j].tobytes()), []).append(want["scores"][j])
  for i in range(n):
    key = (int(got["labels"][i]), got["boxes"][i].tobytes())
    scores = unmatched.get(key, [])
    fits = [j for j, s in enumerate(scores) if abs(s - got["scores"][i]) <= tol(s)]
    assert fits, f"{context}: slot {i}, label {key[0]}, box {got['boxes'][i]}, score {got['scores'][i]}: not in want"
    scores.pop(fits[0])
