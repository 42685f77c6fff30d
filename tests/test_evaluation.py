"""COCO evaluation: parity with torchvision + pycocotools, hand-checkable cases, label mapping, eval.py."""

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from configs import synthetic as synthetic_config
from ssdlite_jax import evaluation, porting
from ssdlite_jax.loading import load_detector
from tests.helpers import REPO, box_iou, import_or_skip, subprocess_env
from tests.torch_reference import random_torchvision_ssdlite, smooth_images, state_dict_numpy

NUM_CLASSES = 5                                                 # background + category ids 1..4
SIZES = [(240, 320), (300, 200), (320, 320), (200, 360), (280, 250), (256, 300), (330, 290)]  # (h, w)
BATCH = 4                                                       # 7 images -> 2 batches, the last padded


def _coco_results(image_ids, outputs):
  """torchvision detections -> COCO results (label == category id), as references/detection does."""
  results = []
  for image_id, out in zip(image_ids, outputs):
    boxes = out["boxes"].detach().numpy().astype(np.float64)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    for box, score, label in zip(xywh.tolist(), out["scores"].tolist(), out["labels"].tolist()):
      results.append({"image_id": image_id, "category_id": int(label), "bbox": box, "score": float(score)})
  return results


def _ground_truth(outputs, rng):
  """Per image: up to 4 of torchvision's best detections (class-agnostic IoU < 0.5 between them), each box
  jittered by a few pixels, plus one made-up box of a random class: AP clearly between 0 and 1."""
  anns = []
  for image_id, (out, (h, w)) in enumerate(zip(outputs, SIZES), start=1):
    boxes, labels = out["boxes"].detach().numpy(), out["labels"].numpy()
    chosen = []
    for k in range(len(boxes)):
      if len(chosen) == 4:
        break
      if all(box_iou(boxes[k], boxes[j]) < 0.5 for j in chosen):
        chosen.append(k)
    objects = [(int(labels[k]), boxes[k] + rng.uniform(-4, 4, 4)) for k in chosen]
    x0, y0 = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
    objects.append((int(rng.integers(1, NUM_CLASSES)), np.array([x0, y0, x0 + rng.uniform(10, w / 2),
                                                                 y0 + rng.uniform(10, h / 2)])))
    for label, (x1, y1, x2, y2) in objects:
      x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
      bbox = [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]
      anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": label, "bbox": bbox,
                   "area": bbox[2] * bbox[3], "iscrowd": 0})
  return anns


@pytest.fixture(scope="module")
def parity_setup(tmp_path_factory):
  """A PNG COCO folder whose GT is derived from a random torchvision SSDlite's own detections, its weights as
  a .pth and torchvision's COCO metrics on it."""
  import_or_skip("torch")
  return _parity_setup(random_torchvision_ssdlite(num_classes=NUM_CLASSES, seed=0), tmp_path_factory)


def _parity_setup(model, tmp_path_factory, one_by_one=False):
  """The COCO folder, weights and torchvision metrics of parity_setup for torchvision `model` (eval mode), run on
  all images at once or, one_by_one, at batch 1 as torchvision's references evaluate (a Faster R-CNN's padded
  canvas, and so its detections, depend on the batch)."""
  torch = import_or_skip("torch")
  root = str(tmp_path_factory.mktemp("parity"))
  os.makedirs(os.path.join(root, "val"))
  os.makedirs(os.path.join(root, "annotations"))
  images, tensors = [], []
  for i, (h, w) in enumerate(SIZES, start=1):
    pixels = (smooth_images(1, h, w, seed=i)[0] * 255).round().astype(np.uint8)
    PIL.Image.fromarray(pixels).save(os.path.join(root, "val", f"{i:04d}.png"))
    images.append({"id": i, "file_name": f"{i:04d}.png", "height": h, "width": w})
    tensors.append(torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float32) / 255.0))
  with torch.no_grad():
    outputs = [model([t])[0] for t in tensors] if one_by_one else model(tensors)
  categories = [{"id": c, "name": f"class{c}"} for c in range(1, NUM_CLASSES)]
  gt_json = os.path.join(root, "annotations", "instances_val.json")
  with open(gt_json, "w") as f:
    json.dump({"images": images, "categories": categories,
               "annotations": _ground_truth(outputs, np.random.default_rng(0))}, f)
  weights = os.path.join(root, "weights.pth")
  torch.save(model.state_dict(), weights)
  results = _coco_results([im["id"] for im in images], outputs)
  reference = evaluation.coco_metrics(results, gt_json)

  config = synthetic_config.get_config()
  config.model.num_classes = NUM_CLASSES
  config.eval_batch_size = BATCH
  config.data.update(name="coco_folder", root=root, val_ann="annotations/instances_val.json",
                     label_mode="category_id", num_parallel_calls=1,
                     data_dir=str(tmp_path_factory.mktemp("tfds")))
  return {"config": config, "weights": weights, "reference": reference, "root": root, "gt_json": gt_json,
          "results": results}


@pytest.mark.torch
def test_per_class_ap_equals_pycocotools_per_category(parity_setup):
  """Each class's AP and AP50 (read from the one COCOeval's precision array) equal a pycocotools evaluation run
  for that category alone."""
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  results, gt_json = parity_setup["results"], parity_setup["gt_json"]
  result = evaluation.coco_evaluation(results, gt_json)
  metrics, per_class = result.metrics, result.per_class
  assert metrics == pytest.approx(parity_setup["reference"])
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO(gt_json)
    for row in per_class:
      one = COCOeval(gt, gt.loadRes([dict(r) for r in results]), iouType="bbox")
      one.params.catIds = [row["category_id"]]
      one.evaluate()
      one.accumulate()
      one.summarize()
      assert row["name"] == f"class{row['category_id']}"
      assert [row[n] for n in evaluation.PER_CLASS_NAMES] == pytest.approx(list(one.stats[:6]), abs=1e-12), row
  scored = [r["AP"] for r in per_class if r["AP"] >= 0]
  assert len(scored) >= 3 and any(0 < ap < 1 for ap in scored)
  table = evaluation.format_per_class(per_class, metrics).splitlines()
  assert table[0].split() == ["class", "AP", "AP50", "AP75", "APs", "APm", "APl"]
  assert table[1].split() == ["all"] + [f"{metrics[n]:.3f}" if metrics[n] >= 0 else "-"
                                        for n in evaluation.PER_CLASS_NAMES]
  assert len(table) == len(per_class) + 2


@pytest.mark.tf
@pytest.mark.torch
def test_parity_with_torchvision_via_eval_run(parity_setup, tmp_path):
  """eval.py's code path (--torch-weights, coco_folder data) reproduces torchvision + pycocotools; the class
  count is the weights' (5), whatever config.model says."""
  from ssdlite_jax.cli import eval as eval_main
  out = str(tmp_path / "out")
  config = parity_setup["config"].copy_and_resolve_references()
  config.model.num_classes = 91
  metrics = eval_main.run(config, torch_weights=parity_setup["weights"], out_dir=out)
  reference = parity_setup["reference"]
  print("ours", metrics, "\ntorchvision", reference)
  assert 0.2 < reference["AP"] < 0.9 and 0.2 < reference["AP50"] <= 1.0, reference
  for name in evaluation.METRIC_NAMES:
    assert abs(metrics[name] - reference[name]) <= 1e-3, (name, metrics[name], reference[name])
  with open(os.path.join(out, "metrics.json")) as f:
    assert json.load(f) == pytest.approx(metrics)
  with open(os.path.join(out, "detections.json")) as f:
    dets = json.load(f)
  assert {d["image_id"] for d in dets} <= set(range(1, len(SIZES) + 1))
  assert set(dets[0]) == {"image_id", "category_id", "bbox", "score"}
  # The confusion matrix counts every ground-truth object once (matched or missed) and every detection scoring
  # >= 0.25 once (matched or false): the numbers of the files it was computed from.
  with open(os.path.join(out, "confusion_matrix.json")) as f:
    matrix = np.asarray(json.load(f)["counts"])
  with open(parity_setup["gt_json"]) as f:
    gt = json.load(f)
  objects = np.bincount([a["category_id"] for a in gt["annotations"]], minlength=NUM_CLASSES)[1:]
  np.testing.assert_array_equal(matrix[:, :-1].sum(axis=0), objects)
  scored = np.bincount([d["category_id"] for d in dets if d["score"] >= 0.25], minlength=NUM_CLASSES)[1:]
  np.testing.assert_array_equal(matrix[:-1].sum(axis=1), scored)
  for name, size in (("pr_curve.png", (900, 700)), ("val_batch_pred.jpg", (1920, 960))):
    with PIL.Image.open(os.path.join(out, "plots", name)) as im:
      assert im.size == size, name


@pytest.mark.tf
@pytest.mark.torch
def test_eval_run_rejects_bad_arguments(parity_setup, tmp_path):
  from ssdlite_jax.cli import eval as eval_main
  config = parity_setup["config"]
  with pytest.raises(ValueError, match="exactly one"):
    eval_main.run(config)
  with pytest.raises(ValueError, match="exactly one"):
    eval_main.run(config, workdir="w", torch_weights=parity_setup["weights"])
  with pytest.raises(FileNotFoundError, match="missing.pth: no such checkpoint directory or weights file"):
    eval_main.run(config, torch_weights=os.path.join(parity_setup["root"], "missing.pth"))
  coco = str(tmp_path / "coco91.safetensors")
  porting.save_state_dict(state_dict_numpy(random_torchvision_ssdlite(num_classes=91, seed=3)), coco)
  with pytest.raises(ValueError, match="the dataset has num_classes=5 .* but the model has 91"):
    eval_main.run(config, torch_weights=coco)


@pytest.mark.tf
@pytest.mark.torch
def test_eval_run_from_workdir_checkpoint(parity_setup, tmp_path):
  """--workdir: the model and its config come from WORKDIR/checkpoints (the latest step by default)."""
  from ssdlite_jax.cli import eval as eval_main
  from ssdlite_jax import checkpoint
  config = parity_setup["config"]
  detector, variables, _ = load_detector(parity_setup["weights"])
  checkpoint.save_variables(str(tmp_path / "checkpoints"), 7, variables, detector.config)
  other = config.copy_and_resolve_references()
  other.model.num_classes = 91       # ignored: the checkpoint's model config is used
  metrics = eval_main.run(other, workdir=str(tmp_path))
  for name in evaluation.METRIC_NAMES:
    assert abs(metrics[name] - parity_setup["reference"][name]) <= 1e-3, name
  assert (tmp_path / "eval" / "metrics.json").exists()
  with pytest.raises(FileNotFoundError):
    eval_main.run(config, workdir=str(tmp_path), step=8)


def _eval_cli(*args, cwd=REPO):
  return subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), *args], cwd=cwd, capture_output=True,
                        text=True, timeout=300, env=subprocess_env(JAX_PLATFORMS="cpu"))


@pytest.mark.tf
@pytest.mark.torch
@pytest.mark.slow
def test_eval_cli_torch_weights(parity_setup, tmp_path):
  """python eval.py --torch-weights ... end to end; the default output folder is ./eval_out."""
  data = parity_setup["config"].data
  proc = _eval_cli(
      "--config", os.path.join(REPO, "configs", "synthetic.py"), "--torch-weights", parity_setup["weights"],
      f"--config.model.num_classes={NUM_CLASSES}", f"--config.eval_batch_size={BATCH}",
      "--config.data.name=coco_folder", f"--config.data.root={data.root}", f"--config.data.val_ann={data.val_ann}",
      "--config.data.label_mode=category_id", f"--config.data.data_dir={data.data_dir}", cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in proc.stdout
  with open(tmp_path / "eval_out" / "metrics.json") as f:
    metrics = json.load(f)
  for name in evaluation.METRIC_NAMES:
    assert abs(metrics[name] - parity_setup["reference"][name]) <= 1e-3, name


@pytest.mark.tf
@pytest.mark.slow
def test_eval_cli_errors_cleanly(tmp_path):
  """The CLI parses its flags and reports a missing checkpoint as a one-line error (no traceback)."""
  proc = _eval_cli("--config", os.path.join(REPO, "configs", "synthetic.py"), "--checkpoint", str(tmp_path / "none"))
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "error:" in proc.stderr and "no such checkpoint directory" in proc.stderr
  assert "Traceback" not in proc.stderr


# --- Hand-checkable cases with a stand-in detector: ground-truth boxes as detections. ---

GAPPED = [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}, {"id": 12, "name": "c"}]
TO_CATEGORY = np.array([-1, 3, 7, 12], np.int32)   # contiguous labels 1..3 -> category ids 3, 7, 12
GT_BOXES = {  # image id -> [(category id, xyxy)]
    10: [(3, [10, 20, 60, 80]), (12, [100, 40, 180, 150])],
    11: [(7, [5, 5, 50, 40]), (7, [60, 60, 190, 170]), (3, [0, 100, 40, 190])],
    12: [(12, [30, 30, 150, 120])],
}


@pytest.fixture(scope="module")
def gapped_gt(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("gapped") / "gt.json")
  anns = []
  for image_id, objs in GT_BOXES.items():
    for cat, (x1, y1, x2, y2) in objs:
      anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
  images = [{"id": i, "file_name": f"{i}.png", "height": 200, "width": 200} for i in GT_BOXES]
  with open(path, "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": GAPPED}, f)
  return path


def _oracle_batches(label_of_category, batch=2, detections=8):
  """Eval batches of the GT images (the last padded) and a detect_fn returning their GT boxes as padded
  detections with labels label_of_category[category id]."""
  ids = list(GT_BOXES) + [-1] * (-len(GT_BOXES) % batch)
  batches = []
  for s in range(0, len(ids), batch):
    chunk = np.array(ids[s:s + batch], np.int64)
    batches.append({"image": chunk.astype(np.float32), "orig_size": np.full((len(chunk), 2), 200, np.int32),
                    "image_id": chunk, "valid": chunk >= 0})

  def detect_fn(variables, image_ids, orig_sizes):
    del variables, orig_sizes
    out = {"boxes": np.zeros((len(image_ids), detections, 4), np.float32),
           "scores": np.zeros((len(image_ids), detections), np.float32),
           "labels": np.zeros((len(image_ids), detections), np.int32),
           "valid": np.zeros((len(image_ids), detections), bool)}
    for i, image_id in enumerate(image_ids.astype(int)):
      for k, (cat, box) in enumerate(GT_BOXES.get(image_id, [])):
        out["boxes"][i, k], out["scores"][i, k] = box, 0.9 - 0.1 * k
        out["labels"][i, k], out["valid"][i, k] = label_of_category[cat], True
    if len(image_ids) and image_ids[-1] < 0:   # garbage in padding slots must be ignored
      out["valid"][-1, 0], out["labels"][-1, 0], out["boxes"][-1, 0] = True, 1, [0, 0, 10, 10]
    return out

  return batches, detect_fn


def test_gt_boxes_as_detections_give_ap_1_and_labels_are_mapped(gapped_gt, tmp_path, capsys):
  batches, detect_fn = _oracle_batches({3: 1, 7: 2, 12: 3})
  metrics = evaluation.evaluate(detect_fn, None, batches, TO_CATEGORY, gapped_gt, out_dir=str(tmp_path))
  assert set(metrics) == set(evaluation.METRIC_NAMES)
  for name in ("AP", "AP50", "AP75", "APm", "APl", "AR10", "AR100", "ARm", "ARl"):
    assert metrics[name] == pytest.approx(1.0), name
  assert metrics["APs"] == metrics["ARs"] == -1.0        # no small ground truth
  # maxDets=1 finds one of image 11's two category-7 boxes: recall (1 + 1/2 + 1) / 3 over the categories
  assert metrics["AR1"] == pytest.approx(5 / 6)
  assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in capsys.readouterr().out
  with open(tmp_path / "detections.json") as f:
    dets = json.load(f)
  assert len(dets) == 6 and {d["category_id"] for d in dets} == {3, 7, 12}
  first = [d for d in dets if d["image_id"] == 10 and d["category_id"] == 3]
  assert first[0]["bbox"] == [10, 20, 50, 60]   # xyxy -> xywh
  with open(tmp_path / "metrics.json") as f:
    assert json.load(f) == pytest.approx(metrics)


def test_unmapped_labels_score_lower(gapped_gt):
  """The same detections without the label -> category id mapping (labels taken as category ids) lose AP."""
  batches, detect_fn = _oracle_batches({3: 1, 7: 2, 12: 3})
  identity = np.arange(13, dtype=np.int32)
  metrics = evaluation.evaluate(detect_fn, None, batches, identity, gapped_gt)
  assert metrics["AP"] < 0.5


def test_empty_detections_give_zeros(gapped_gt, tmp_path, caplog):
  batches, _ = _oracle_batches({})

  def nothing(variables, images, orig_sizes):
    n = len(images)
    return {"boxes": np.zeros((n, 4, 4), np.float32), "scores": np.zeros((n, 4), np.float32),
            "labels": np.zeros((n, 4), np.int32), "valid": np.zeros((n, 4), bool)}

  metrics = evaluation.evaluate(nothing, None, batches, TO_CATEGORY, gapped_gt, out_dir=str(tmp_path))
  assert metrics == {name: 0.0 for name in evaluation.METRIC_NAMES}
  assert "no detections" in caplog.text
  with open(tmp_path / "detections.json") as f:
    assert json.load(f) == []


@pytest.mark.tf
@pytest.mark.torch
def test_faster_rcnn_eval_run_equals_torchvision(tmp_path_factory, tmp_path):
  """eval.py on a fasterrcnn_mobilenet_v3_large_320_fpn state_dict (5 classes, class biases spread so that
  detections pass 0.05): every image decoded at its own size (200..360 px) and resized by the detector's transform,
  one per batch; the 12 COCO metrics within 1e-3 of torchvision + pycocotools on the same folder."""
  torch = import_or_skip("torch")
  from ssdlite_jax.cli import eval as eval_main
  from ssdlite_jax.rcnn.configs import fasterrcnn_mobilenet_v3_large_320_fpn_config
  from tests.torch_reference import torch_fasterrcnn_mobilenet
  model = torch_fasterrcnn_mobilenet("320", num_classes=NUM_CLASSES)
  with torch.no_grad():
    model.roi_heads.box_predictor.cls_score.bias.normal_(0.0, 3.0, generator=torch.Generator().manual_seed(5))
  setup = _parity_setup(model, tmp_path_factory, one_by_one=True)
  config = setup["config"]
  config.model = fasterrcnn_mobilenet_v3_large_320_fpn_config()   # the weights are read as it describes them
  metrics = eval_main.run(config, torch_weights=setup["weights"], out_dir=str(tmp_path / "out"))
  reference = setup["reference"]
  print("ours", metrics, "\ntorchvision", reference)
  assert 0.1 < reference["AP"] < 0.9, reference   # 0.182: clearly between nothing and everything
  for name in evaluation.METRIC_NAMES:
    assert abs(metrics[name] - reference[name]) <= 1e-3, (name, metrics[name], reference[name])
