"""The detection selection alone (scores, per-class top-k, NMS, the best D) on inputs built where it breaks
(tests/selection_cases.py: zero-area boxes on every border, identical boxes in several classes, IoUs at exactly the
threshold, score ties, fewer detections than D, none), at 2, 11 and 91 classes: postprocess.select against
torchvision's own ops, and the tflite / saved_model formats' copy of it (export/tflite.py `select`) on LiteRT and on
TensorFlow against postprocess.select, every one of the D slots. ONNX: tests/test_export_onnx.py."""

import numpy as np
import pytest

from tests import selection_cases
from tests.helpers import import_or_skip
from tests.selection_cases import CASES, assert_same_selection, predictor_selection


def test_the_cases_are_what_they_say():
  """Each case reaches the state it is named for, in the Predictor's selection."""
  for name, (num_classes, _, _, _, _) in selection_cases.CONFIGS.items():
    dets = {case: predictor_selection(name, case) for case in CASES[name]}
    zero = lambda det: ((det["boxes"][:, 2] - det["boxes"][:, 0]) * (det["boxes"][:, 3] - det["boxes"][:, 1]) == 0
                        ) & det["valid"]
    assert zero(dets["zero_area"]).sum() >= 10, name
    assert int(dets["few"]["valid"].sum()) == 7 and not dets["none"]["valid"].any(), name
    tie_pairs = selection_cases._iou_tie_pairs(selection_cases.CONFIGS[name][2], 1)
    kept = {tuple(b) for b in dets["iou_ties"]["boxes"][dets["iou_ties"]["valid"]]}
    assert not {tuple(b) for b in tie_pairs} <= kept, name   # torchvision suppresses at IoU == float32(thr)
    if num_classes > 2:
      same = dets["same_boxes"]
      assert len({tuple(b) for b in same["boxes"][same["valid"]]}) < same["valid"].sum(), name


@pytest.mark.torch
@pytest.mark.parametrize("name", list(selection_cases.CONFIGS))
def test_predictor_selection_equals_torchvision(name):
  """postprocess.select against torchvision's SSD.postprocess_detections written with its ops (softmax, per class
  score > thr and topk, box_ops.batched_nms, the best D) on the cases whose outcome no tie rule decides."""
  torch = import_or_skip("torch")
  from torchvision.ops import boxes as box_ops
  cfg = selection_cases.config(name)
  for case in ("random", "zero_area", "iou_ties", "few", "none"):
    boxes, logits = (torch.from_numpy(a) for a in CASES[name][case])
    scores = torch.softmax(logits, -1)
    all_boxes, all_scores, all_labels = [], [], []
    for label in range(1, cfg.num_classes):
      score = scores[:, label]
      keep = score > cfg.score_thresh
      score, box = score[keep], boxes[keep]
      score, idx = score.topk(min(cfg.topk_candidates, score.size(0)))
      all_boxes.append(box[idx])
      all_scores.append(score)
      all_labels.append(torch.full_like(idx, label))
    all_boxes, all_scores, all_labels = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
    keep = box_ops.batched_nms(all_boxes, all_scores, all_labels, cfg.nms_thresh)[:cfg.detections_per_img]
    d, n = cfg.detections_per_img, len(keep)
    want = {"boxes": np.zeros((d, 4), np.float32), "labels": np.zeros(d, np.int64), "scores": np.zeros(d, np.float32),
            "valid": np.arange(d) < n}
    want["boxes"][:n], want["labels"][:n], want["scores"][:n] = (t[keep].numpy() for t in (all_boxes, all_labels,
                                                                                           all_scores))
    assert_same_selection(predictor_selection(name, case), want, f"{name} {case}")


def _tf_select(name, inclusive_nms):
  """The formats' selection for CONFIGS[name] as a tf.function (boxes [A, 4], logits [A, K])."""
  tf = import_or_skip("tensorflow")
  from ssdlite_jax.export import tflite
  num_classes, anchors, _, _, _ = selection_cases.CONFIGS[name]
  cfg = selection_cases.config(name)
  spec = [tf.TensorSpec([anchors, 4], tf.float32), tf.TensorSpec([anchors, num_classes], tf.float32)]
  return tf.function(lambda boxes, logits: tflite.select(boxes, logits, cfg, inclusive_nms), input_signature=spec,
                     autograph=False)


def _as_selection(boxes, classes, scores, valid):
  return {"boxes": np.asarray(boxes), "labels": np.where(valid, np.asarray(classes) + 1, 0),
          "scores": np.asarray(scores), "valid": np.asarray(valid)}


@pytest.mark.tf
@pytest.mark.parametrize("name", list(selection_cases.CONFIGS))
def test_litert_selection_equals_the_predictor(name):
  """The tflite formats' selection converted as export() converts it (builtin ops only) and run on LiteRT."""
  tf = import_or_skip("tensorflow")
  interpreter_lib = import_or_skip("ai_edge_litert.interpreter")
  fn = _tf_select(name, inclusive_nms=True)
  converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  interpreter = interpreter_lib.Interpreter(model_content=converter.convert())
  interpreter.allocate_tensors()
  inputs = sorted(interpreter.get_input_details(), key=lambda d: d["shape"][-1] != 4)   # boxes, then logits
  for case, arrays in CASES[name].items():
    for detail, array in zip(inputs, arrays):
      interpreter.set_tensor(detail["index"], array)
    interpreter.invoke()
    got = [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]
    assert_same_selection(_as_selection(*got), predictor_selection(name, case), f"{name} {case}")


@pytest.mark.tf
@pytest.mark.parametrize("name", list(selection_cases.CONFIGS))
def test_tensorflow_selection_equals_the_predictor(name):
  """The saved_model format's selection (TensorFlow's NMS kernel, IoU > t) run by TensorFlow."""
  fn = _tf_select(name, inclusive_nms=False)
  for case, (boxes, logits) in CASES[name].items():
    got = [t.numpy() for t in fn(boxes, logits)]
    assert_same_selection(_as_selection(*got), predictor_selection(name, case), f"{name} {case}")
