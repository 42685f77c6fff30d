"""COCO bbox evaluation with pycocotools, as torchvision's references/detection CocoEvaluator.

    detect_fn = detect.make_detect_fn(detector)
    source = pipeline.open_source(config.data)
    batches, _ = pipeline.create_eval_dataset(source, global_batch_size=..., image_size=detector.image_size)
    metrics = evaluate(detect_fn, variables, batches, source.info.label_to_category_id, source.info.gt_json,
                       out_dir="eval")

Detections (padded, on device) -> COCO results {"image_id", "category_id", "bbox": [x, y, w, h] original
pixels, "score"}; model labels become the ground truth's category ids through `label_to_category_id`
(labels mapped to -1 are dropped: COCOeval would ignore a category absent from the ground truth anyway).

Multi-host: every process runs its own shard of the eval batches; the padded detections of all processes are
gathered to every process with `process_allgather`, process 0 runs COCOeval (and writes the files), and the
12 metrics are broadcast, so every process returns the same dict.
"""

import contextlib
import dataclasses
import io
import json
import logging
import os
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np

from ssdlite_jax import confusion, distributed, files

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
PER_CLASS_NAMES = METRIC_NAMES[:6]


def _collect(detect_fn, variables, eval_batches):
  """Runs every batch; returns host arrays image_id [N], boxes [N, D, 4], scores/labels/valid [N, D] (N = this
  process's examples including padding, whose image_id is -1). The next batch is dispatched before the
  previous result is fetched, so host work overlaps device work."""
  parts, pending = [], None
  for batch in eval_batches:
    out = detect_fn(variables, batch["image"], batch["orig_size"])
    ids = np.where(np.asarray(batch["valid"], bool), np.asarray(batch["image_id"], np.int64), -1)
    if pending is not None:
      parts.append(_fetch(*pending))
    pending = (ids, out)
  if pending is not None:
    parts.append(_fetch(*pending))
  if not parts:
    return None
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _fetch(ids, out):
  out = jax.device_get(out)
  return {"image_id": ids, "boxes": np.asarray(out["boxes"], np.float32),
          "scores": np.asarray(out["scores"], np.float32), "labels": np.asarray(out["labels"], np.int32),
          "valid": np.asarray(out["valid"], bool)}


def _gather(local):
  """Concatenates every process's arrays (same shapes on all processes: same batch count and size)."""
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils
  distributed.wait_for_all_processes("eval_gather")  # processes finish their shards at different times
  if np.abs(local["image_id"]).max(initial=0) > np.iinfo(np.int32).max:
    raise ValueError("multi-process evaluation gathers image ids as int32 (JAX without x64); got larger ids")
  gathered = multihost_utils.process_allgather(local, tiled=True)
  return {k: np.asarray(v) for k, v in gathered.items()}


def to_coco_results(dets, label_to_category_id) -> List[Dict]:
  """COCO results list from padded detections (image_id -1 and invalid slots skipped)."""
  to_category = np.asarray(label_to_category_id, np.int64)
  results = []
  for i in np.flatnonzero(dets["image_id"] >= 0):
    keep = dets["valid"][i]
    labels = dets["labels"][i][keep]
    in_range = (labels >= 0) & (labels < len(to_category))
    cats = np.where(in_range, to_category[np.clip(labels, 0, len(to_category) - 1)], -1)
    boxes = dets["boxes"][i][keep].astype(np.float64)
    scores = dets["scores"][i][keep].astype(np.float64)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    image_id = int(dets["image_id"][i])
    for box, score, cat in zip(xywh.tolist(), scores.tolist(), cats.tolist()):
      if cat >= 0:
        results.append({"image_id": image_id, "category_id": int(cat), "bbox": box, "score": score})
  return results


@dataclasses.dataclass
class CocoEvaluation:
  """What one COCOeval (bbox) run gives.

  metrics: {name: value} of the 12 stats (METRIC_NAMES). per_class: [{"category_id", "name", "AP", "AP50",
  "AP75", "APs", "APm", "APl"}], from the accumulated precision [T, R, K, A, M] at 100 detections, as
  summarize() averages it over classes (-1 for a class without ground truth in that range).
  recall [R]: COCOeval's recall thresholds; precision50 [R, K]: the precision at IoU 0.5 for each (the PR
  curves), -1 where a class has no ground truth.
  """
  metrics: Dict[str, float]
  per_class: List[Dict]
  recall: np.ndarray
  precision50: np.ndarray


def coco_metrics(results: List[Dict], gt_json: str, image_ids=None) -> Dict[str, float]:
  """{name: value} of the 12 COCO bbox stats (see coco_evaluation)."""
  return coco_evaluation(results, gt_json, image_ids).metrics


def coco_evaluation(results: List[Dict], gt_json: str, image_ids=None) -> CocoEvaluation:
  """Runs COCOeval (bbox) and prints what COCOeval.summarize() prints. An empty results list gives zeros (with a
  warning) instead of pycocotools' crash. image_ids: the images to evaluate (default: all of the ground truth)."""
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval

  if not results:
    logging.warning("no detections: COCO metrics are all 0")
    return CocoEvaluation({name: 0.0 for name in METRIC_NAMES}, [], np.linspace(0, 1, 101), np.zeros((101, 0)))
  with contextlib.redirect_stdout(io.StringIO()), files.local_file(gt_json) as local:  # pycocotools' chatter
    gt = COCO(local)
    dt = gt.loadRes([dict(r) for r in results])   # loadRes mutates its input
    coco_eval = COCOeval(gt, dt, iouType="bbox")
    if image_ids is not None:
      coco_eval.params.imgIds = sorted(int(i) for i in image_ids)
    coco_eval.evaluate()
    coco_eval.accumulate()
  coco_eval.summarize()
  precision = coco_eval.eval["precision"][..., -1]   # [IoU thresholds, recalls, classes, areas] at 100 dets
  iou = {"AP": slice(None), "AP50": 0, "AP75": 5}      # IoU thresholds .50:.05:.95
  area = {"APs": 1, "APm": 2, "APl": 3}

  def mean(p):
    p = p[p > -1]
    return float(p.mean()) if p.size else -1.0
  per_class = [{"category_id": int(c), "name": gt.cats[c]["name"],
                **{n: mean(precision[t, :, k, 0]) for n, t in iou.items()},
                **{n: mean(precision[:, :, k, a]) for n, a in area.items()}}
               for k, c in enumerate(coco_eval.params.catIds)]
  return CocoEvaluation({name: float(v) for name, v in zip(METRIC_NAMES, coco_eval.stats)}, per_class,
                        np.asarray(coco_eval.params.recThrs), precision[0, :, :, 0])


def format_per_class(per_class: List[Dict], metrics: Optional[Dict[str, float]] = None) -> str:
  """A table of AP, AP50, AP75, APs, APm, APl: a first row 'all' from metrics (when given), then one row per
  class ('-' where a class has no ground truth in that range)."""
  names = PER_CLASS_NAMES
  width = max([len("class"), len("all")] + [len(r["name"]) for r in per_class])
  cell = lambda v: f"{v:8.3f}" if v >= 0 else f"{'-':>8}"
  rows = [f"{'class':<{width}}" + "".join(f"{n:>8}" for n in names)]
  if metrics:
    rows.append(f"{'all':<{width}}" + "".join(cell(metrics[n]) for n in names))
  rows += [f"{r['name']:<{width}}" + "".join(cell(r[n]) for n in names) for r in per_class]
  return "\n".join(rows)


def _broadcast(metrics: Optional[Dict[str, float]]) -> Dict[str, float]:
  if jax.process_count() == 1:
    return metrics
  from jax.experimental import multihost_utils
  values = np.asarray([metrics[n] for n in METRIC_NAMES] if metrics else [0.0] * len(METRIC_NAMES), np.float32)
  distributed.wait_for_all_processes("eval_broadcast")  # the others wait while process 0 runs COCOeval
  values = multihost_utils.broadcast_one_to_all(values)
  return {n: float(v) for n, v in zip(METRIC_NAMES, np.asarray(values))}


@dataclasses.dataclass
class EvalPlots:
  """What `evaluate` draws into `dir`: pr_curve.png and confusion_matrix.png; with examples
  (pipeline.eval_examples: image, boxes, labels, image_id), the mosaics val_batch_labels.jpg (ground truth) and
  val_batch_pred.jpg (detections scoring >= evaluate's score_threshold)."""
  dir: str
  class_names: Sequence[str]
  examples: Sequence[Dict] = ()


def evaluate(detect_fn, variables, eval_batches, label_to_category_id, gt_json: str,
             out_dir: Optional[str] = None, plots: Optional[EvalPlots] = None,
             score_threshold: float = 0.25) -> Dict[str, float]:
  """The 12 COCO bbox metrics (METRIC_NAMES) of the detector over eval_batches (this process's shard, as
  pipeline.create_eval_dataset makes them: image, orig_size, image_id, valid), against gt_json.

  Every process must call it (collective gather); process 0 runs COCOeval, prints its summary and the per-class
  AP/AP50 table and, with out_dir, writes out_dir/detections.json (COCO results format), metrics.json,
  per_class.json and confusion_matrix.json (see ssdlite_jax.confusion; IoU >= 0.5, detections scoring >=
  score_threshold); with plots, the pictures of EvalPlots. All processes return the same
  metrics. Images of gt_json that were not evaluated are logged and left out of the metrics.
  """
  local = _collect(detect_fn, variables, eval_batches)
  if local is None:
    raise ValueError("evaluate: no eval batches")
  dets = _gather(local)
  metrics = None
  if jax.process_index() == 0:
    results = to_coco_results(dets, label_to_category_id)
    evaluated = set(int(i) for i in dets["image_id"] if i >= 0)
    gt = json.loads(files.read_text(gt_json))
    gt_ids = set(int(im["id"]) for im in gt["images"])
    if evaluated - gt_ids:
      raise ValueError(f"evaluated image ids not in {gt_json}: {sorted(evaluated - gt_ids)[:10]}")
    image_ids = None
    if gt_ids - evaluated:
      logging.warning("%d images of %s were not evaluated; metrics cover the %d evaluated ones",
                      len(gt_ids - evaluated), gt_json, len(evaluated))
      image_ids = evaluated
    if out_dir:
      files.write_text_atomically(os.path.join(out_dir, "detections.json"), json.dumps(results))
    result = coco_evaluation(results, gt_json, image_ids)
    metrics = result.metrics
    if result.per_class:
      print(format_per_class(result.per_class, metrics))
    names = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    matrix = confusion.confusion_matrix(results, gt, score_threshold=score_threshold, image_ids=image_ids)
    if out_dir:
      for name, value in (("metrics", metrics), ("per_class", result.per_class),
                          ("confusion_matrix", {"rows": "predicted", "columns": "true", "iou_threshold": 0.5,
                                                "score_threshold": score_threshold,
                                                "classes": names + ["background"], "counts": matrix.tolist()})):
        files.write_text_atomically(os.path.join(out_dir, f"{name}.json"), json.dumps(value, indent=2))
    if plots:
      _draw(plots, result, matrix, names, dets, score_threshold)
  return _broadcast(metrics)


def _draw(plots: EvalPlots, result: CocoEvaluation, matrix, names, dets, score_threshold):
  from ssdlite_jax import plots as figures, visualize
  figures.plot_confusion_matrix(matrix, names, os.path.join(plots.dir, "confusion_matrix.png"))
  pr_curve = os.path.join(plots.dir, "pr_curve.png")
  if result.per_class:
    figures.plot_pr_curves(result.recall, result.precision50, [r["name"] for r in result.per_class],
                           [r["AP50"] for r in result.per_class], pr_curve)
  else:   # no detections: no curve, and not the previous evaluation's
    files.remove(pr_curve)
  if plots.examples:
    row = {int(i): k for k, i in enumerate(dets["image_id"]) if i >= 0}
    truth, pred = [], []
    for ex in plots.examples:
      truth.append(visualize.draw_boxes(ex["image"], ex["boxes"], ex["labels"], plots.class_names))
      k = row[int(ex["image_id"])]
      valid = dets["valid"][k]
      pred.append(visualize.draw_boxes(ex["image"], dets["boxes"][k][valid], dets["labels"][k][valid],
                                       plots.class_names, dets["scores"][k][valid], score_threshold))
    for name, images in (("val_batch_labels.jpg", truth), ("val_batch_pred.jpg", pred)):
      mosaic = visualize.mosaic(images)
      files.write_atomically(os.path.join(plots.dir, name), lambda tmp: mosaic.save(tmp, format="JPEG", quality=90))
