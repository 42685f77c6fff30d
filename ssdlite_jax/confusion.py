"""Detection confusion matrix: which class each ground-truth object was detected as, or missed.

Per image, ground-truth objects (crowd ones apart) and detections scoring >= score_threshold are matched one
to one regardless of class, greedily by decreasing IoU, pairs with IoU >= iou_threshold only (as Ultralytics'
ConfusionMatrix). A matched pair counts at [predicted class, true class]; an unmatched object at
[background, true class] (missed); an unmatched detection at [predicted class, background] (false), unless it
covers a crowd object of its own class (intersection over its own area >= iou_threshold, COCOeval's crowd
overlap): then it is not counted, as COCOeval ignores it.
"""

from typing import Dict, List, Optional

import numpy as np


def _xyxy(xywh):
  xywh = np.asarray(xywh, np.float64).reshape(-1, 4)
  return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)


def _overlaps(dets, gts):
  """(IoU [D, G], intersection over the detection's area [D, G]) of xyxy boxes."""
  lt = np.maximum(dets[:, None, :2], gts[None, :, :2])
  rb = np.minimum(dets[:, None, 2:], gts[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
  area_d = np.prod(dets[:, 2:] - dets[:, :2], axis=-1)[:, None]
  area_g = np.prod(gts[:, 2:] - gts[:, :2], axis=-1)[None, :]
  with np.errstate(divide="ignore", invalid="ignore"):
    return (np.nan_to_num(inter / (area_d + area_g - inter)), np.nan_to_num(inter / area_d))


def confusion_matrix(results: List[Dict], gt: Dict, iou_threshold: float = 0.5, score_threshold: float = 0.25,
                     image_ids: Optional[set] = None) -> np.ndarray:
  """Counts [K + 1, K + 1] int64, rows predicted, columns true, in the order of gt["categories"] sorted by id;
  index K is background. results: COCO results (xywh pixels); gt: a COCO instances dict; image_ids: the images
  to count (default: all of gt)."""
  index = {c["id"]: k for k, c in enumerate(sorted(gt["categories"], key=lambda c: c["id"]))}
  bg = len(index)
  matrix = np.zeros((bg + 1, bg + 1), np.int64)
  ids = set(im["id"] for im in gt["images"]) if image_ids is None else set(image_ids)
  gts = {i: [] for i in ids}
  for a in gt["annotations"]:
    if a["image_id"] in gts:
      gts[a["image_id"]].append(a)
  dets = {i: [] for i in ids}
  for r in results:
    if r["image_id"] in dets and r["score"] >= score_threshold and r["category_id"] in index:
      dets[r["image_id"]].append(r)
  for image_id in ids:
    objects = [a for a in gts[image_id] if not a.get("iscrowd")]
    crowds = [a for a in gts[image_id] if a.get("iscrowd")]
    crowd_class = np.asarray([index[a["category_id"]] for a in crowds], np.int64)
    det_boxes = _xyxy([d["bbox"] for d in dets[image_id]])
    true = [index[a["category_id"]] for a in objects]
    pred = [index[d["category_id"]] for d in dets[image_id]]
    iou = _overlaps(det_boxes, _xyxy([a["bbox"] for a in objects]))[0]
    det_used, gt_used = np.zeros(len(pred), bool), np.zeros(len(true), bool)
    for d, g in sorted(zip(*np.nonzero(iou >= iou_threshold)), key=lambda p: -iou[p]):
      if not det_used[d] and not gt_used[g]:
        det_used[d] = gt_used[g] = True
        matrix[pred[d], true[g]] += 1
    for g in np.flatnonzero(~gt_used):
      matrix[bg, true[g]] += 1
    covers = _overlaps(det_boxes, _xyxy([a["bbox"] for a in crowds]))[1] >= iou_threshold
    on_crowd = (covers & (np.asarray(pred, np.int64)[:, None] == crowd_class[None, :])).any(axis=1)
    for d in np.flatnonzero(~det_used & ~on_crowd):
      matrix[pred[d], bg] += 1
  return matrix
