"""ONNX export (opset OPSET, dynamic batch), the post-processing included, for onnxruntime and other ONNX runtimes.

  input    images [b, S, S, 3] float32 RGB in [0, 1], already resized to the model size S (bilinear, half-pixel
           centres, no antialias, as the Predictor), b >= 1 any batch size
  outputs  boxes [b, D, 4] float32 (x1, y1, x2, y2) as fractions of the image width / height (multiply by
           (w, h, w, h) of the original image for its pixels); scores [b, D] float32; labels [b, D] int64
           (index into the class names, 0 = background: the Predictor's labels); num [b] int64: valid detections
           per image. D = detections_per_img; the valid detections come first, sorted by descending score; the
           other slots are zero (an image with nothing above score_thresh gives num 0, not an error).

The network, box decoding + clipping and the softmax are the JAX model, converted by jax2onnx; the selection is
appended as plain ONNX ops (onnx.helper) doing what postprocess.select does: per class, the top `topk_candidates`
scores above `score_thresh` (TopK); per class greedy NMS (one `NonMaxSuppression`, each (image, class) pair a
batch entry of its own, so classes never interact); the best D overall (TopK) and the gathers. What the ONNX
spec leaves to the runtime the graph decides: the NMS ranks candidates by position (score ties go to the lower
one), zero-area candidates are kept outside it, and its float32 IoU threshold makes `IoU > t` torchvision's
decision (nms.float32_iou_threshold). Both TopKs break ties by the lower index, as lax.top_k: the
detections are the Predictor's (tests/test_export_selection.py, tests/test_export_onnx.py).

Needs jax2onnx and onnx to convert, which pin an older orbax-checkpoint than requirements.txt: a separate venv,
`pip install -r requirements-onnx.txt -e .`. Running the file needs only onnxruntime (or another ONNX runtime):

    import onnxruntime as ort
    session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
    boxes, scores, labels, num = session.run(None, {"images": images})
"""

from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ssdlite_jax import nms
from ssdlite_jax.ssd import postprocess
from ssdlite_jax.export import network_and_decode
from ssdlite_jax.detector import Detector

# Plain XLA convolutions (grouped and 1x1 lax.conv), which jax2onnx converts to ONNX Conv.
KERNELS = "xla"
OPSET = 18
OUTPUTS = ("boxes", "scores", "labels", "num")
INSTALL = "pip install -r requirements-onnx.txt -e . (in a venv of its own: jax2onnx pins an older orbax-checkpoint)"


def _require():
  """(jax2onnx, onnx), or a ModuleNotFoundError that says how to install them."""
  try:
    import jax2onnx
    import onnx
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError(f"--format onnx needs {e.name}: {INSTALL}", name=e.name) from e
  return jax2onnx, onnx


def _network_scores_and_boxes(detector: Detector, variables):
  """images [B, S, S, 3] in [0, 1] -> (boxes [B, A, 4] xyxy model px, decoded and clipped; foreground scores
  [B, C, A], softmax over all K = C + 1 classes)."""
  jax_part = network_and_decode(detector, variables)

  def fn(images):
    boxes, logits = jax_part(images)
    return boxes, jnp.swapaxes(jax.nn.softmax(logits, axis=-1)[..., 1:], 1, 2)
  return fn


def network_model(detector: Detector, variables: Dict[str, Any]):
  """The JAX part alone as an onnx.ModelProto: images [b, S, S, 3] -> boxes_all [b, A, 4] xyxy model px,
  scores_all [b, C, A] (what the post-processing ops of `export` read)."""
  jax2onnx, _ = _require()
  fn = _network_scores_and_boxes(detector, jax.device_get(variables))
  return jax2onnx.to_onnx(fn, [("b", *detector.image_size, 3)], model_name="ssdlite", opset=OPSET,
                          input_names=["images"], output_names=["boxes_all", "scores_all"])


def _append_postprocess(model, detector: Detector):
  """Replaces the outputs of `network_model`'s graph with the OUTPUTS of the selection (module docstring)."""
  _, onnx = _require()
  from onnx import TensorProto, helper, numpy_helper

  cfg = detector.config
  height, width = detector.image_size
  num_fg = cfg.num_classes - 1
  k, d = postprocess.selection_sizes(cfg, len(detector.anchors))
  graph = model.graph
  consts = {
      "score_thresh": np.float32(cfg.score_thresh), "minus_one": np.float32(-1.0), "zero_f": np.float32(0.0),
      "k": np.array([k], np.int64), "k_scalar": np.int64(k), "d": np.array([d], np.int64),
      "one_i": np.int64(1), "zero_i": np.int64(0), "nms_max": np.array([k], np.int64),
      "nms_iou": np.array([nms.float32_iou_threshold(cfg.nms_thresh)], np.float32),
      "nms_score": np.array([0.0], np.float32), "rank": np.arange(k, 0, -1, dtype=np.float32),
      "shape_idx": np.array([0, -1, 1], np.int64), "shape_nms_boxes": np.array([-1, k, 4], np.int64),
      "shape_nms_scores": np.array([-1, 1, k], np.int64), "shape_flat": np.array([-1], np.int64),
      "shape_per_image": np.array([-1, num_fg * k], np.int64), "axis_1": np.array([1], np.int64),
      "axis_2": np.array([2], np.int64), **{f"col_{i}": np.int64(i) for i in range(4)},
      "image_scale": np.array([width, height, width, height], np.float32),
  }
  graph.initializer.extend(numpy_helper.from_array(v, "pp_" + n) for n, v in consts.items())
  c = lambda n: "pp_" + n
  node = lambda op, ins, outs, **kw: graph.node.append(helper.make_node(op, ins, outs, **kw))

  # Per class, the top k scores above the threshold (the others -1) and their boxes.
  node("Greater", ["scores_all", c("score_thresh")], ["pp_above"])
  node("Where", ["pp_above", "scores_all", c("minus_one")], ["pp_masked"])
  node("TopK", ["pp_masked", c("k")], ["pp_cand_scores", "pp_cand_idx"], axis=-1, largest=1, sorted=1)  # [b, C, k]
  node("Reshape", ["pp_cand_idx", c("shape_idx")], ["pp_cand_idx3"])                                 # [b, C*k, 1]
  node("GatherND", ["boxes_all", "pp_cand_idx3"], ["pp_cand_boxes"], batch_dims=1)                   # [b, C*k, 4]
  # Zero-area candidates stay out of the NMS and are kept (torchvision never suppresses them, nor by them; ONNX
  # leaves a degenerate box's IoU to the runtime); the NMS ranks the others by position, so that ties go to the
  # lower position in every runtime, as in postprocess.select.
  for i, coord in enumerate(("x1", "y1", "x2", "y2")):
    node("Gather", ["pp_cand_boxes", c(f"col_{i}")], [f"pp_{coord}"], axis=2)                      # [b, C*k]
  node("Sub", ["pp_x2", "pp_x1"], ["pp_w"])
  node("Sub", ["pp_y2", "pp_y1"], ["pp_h"])
  node("Mul", ["pp_w", "pp_h"], ["pp_area"])
  node("LessOrEqual", ["pp_area", c("zero_f")], ["pp_zero_area_flat"])
  node("Shape", ["pp_cand_scores"], ["pp_cand_shape"])
  node("Reshape", ["pp_zero_area_flat", "pp_cand_shape"], ["pp_zero_area"])                          # [b, C, k]
  node("GreaterOrEqual", ["pp_cand_scores", c("zero_f")], ["pp_cand_valid"])
  node("Not", ["pp_zero_area"], ["pp_has_area"])
  node("And", ["pp_cand_valid", "pp_has_area"], ["pp_nms_valid"])
  node("Where", ["pp_nms_valid", c("rank"), c("minus_one")], ["pp_nms_ranks"])
  # NMS with every (image, class) pair as a batch entry of k boxes; -1 scores are below its score threshold.
  node("Reshape", ["pp_cand_boxes", c("shape_nms_boxes")], ["pp_nms_boxes"])                         # [b*C, k, 4]
  node("Reshape", ["pp_nms_ranks", c("shape_nms_scores")], ["pp_nms_scores"])                        # [b*C, 1, k]
  node("NonMaxSuppression", ["pp_nms_boxes", "pp_nms_scores", c("nms_max"), c("nms_iou"), c("nms_score")],
       ["pp_selected"], center_point_box=0)                                                           # [N, 3]
  node("Gather", ["pp_selected", c("col_0")], ["pp_sel_entry"], axis=1)
  node("Gather", ["pp_selected", c("col_2")], ["pp_sel_box"], axis=1)
  node("Mul", ["pp_sel_entry", c("k_scalar")], ["pp_sel_base"])
  node("Add", ["pp_sel_base", "pp_sel_box"], ["pp_sel_flat"])
  node("Unsqueeze", ["pp_sel_flat", c("axis_1")], ["pp_sel_flat2"])                                   # [N, 1]
  # kept [b*C*k]: where NMS selected the candidate or it is a valid zero-area one; the kept scores, the others -1.
  node("Reshape", ["pp_cand_scores", c("shape_flat")], ["pp_flat_scores"])
  node("Shape", ["pp_flat_scores"], ["pp_flat_shape"])
  node("ConstantOfShape", ["pp_flat_shape"], ["pp_zeros"], value=helper.make_tensor("", TensorProto.FLOAT, [1], [0]))
  node("Shape", ["pp_sel_flat"], ["pp_sel_shape"])
  node("ConstantOfShape", ["pp_sel_shape"], ["pp_ones"], value=helper.make_tensor("", TensorProto.FLOAT, [1], [1]))
  node("ScatterND", ["pp_zeros", "pp_sel_flat2", "pp_ones"], ["pp_kept"])
  node("Greater", ["pp_kept", c("zero_f")], ["pp_kept_nms"])
  node("And", ["pp_cand_valid", "pp_zero_area"], ["pp_kept_zero_area"])
  node("Reshape", ["pp_kept_zero_area", c("shape_flat")], ["pp_kept_zero_area_flat"])
  node("Or", ["pp_kept_nms", "pp_kept_zero_area_flat"], ["pp_kept_mask"])
  node("Where", ["pp_kept_mask", "pp_flat_scores", c("minus_one")], ["pp_kept_scores_flat"])
  node("Reshape", ["pp_kept_scores_flat", c("shape_per_image")], ["pp_kept_scores"])                 # [b, C*k]
  # The best d per image, and their boxes and labels.
  node("TopK", ["pp_kept_scores", c("d")], ["pp_top_scores", "pp_order"], axis=-1, largest=1, sorted=1)  # [b, d]
  node("Unsqueeze", ["pp_order", c("axis_2")], ["pp_order3"])
  node("GatherND", ["pp_cand_boxes", "pp_order3"], ["pp_top_boxes"], batch_dims=1)                   # [b, d, 4]
  node("Div", ["pp_order", c("k_scalar")], ["pp_class"])
  node("Add", ["pp_class", c("one_i")], ["pp_labels_all"])
  node("Greater", ["pp_top_scores", c("zero_f")], ["pp_valid"])
  node("Unsqueeze", ["pp_valid", c("axis_2")], ["pp_valid3"])
  node("Div", ["pp_top_boxes", c("image_scale")], ["pp_boxes_frac"])
  node("Where", ["pp_valid3", "pp_boxes_frac", c("zero_f")], ["boxes"])
  node("Where", ["pp_valid", "pp_top_scores", c("zero_f")], ["scores"])
  node("Where", ["pp_valid", "pp_labels_all", c("zero_i")], ["labels"])
  node("Cast", ["pp_valid"], ["pp_valid_i"], to=TensorProto.INT64)
  node("ReduceSum", ["pp_valid_i", c("axis_1")], ["num"], keepdims=0)

  del graph.output[:]
  graph.output.extend([
      helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["b", d, 4]),
      helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["b", d]),
      helper.make_tensor_value_info("labels", TensorProto.INT64, ["b", d]),
      helper.make_tensor_value_info("num", TensorProto.INT64, ["b"])])
  onnx.checker.check_model(model, full_check=True)
  return model, d


def export(detector: Detector, variables: Dict[str, Any]) -> Tuple[bytes, Dict[str, Any]]:
  """(the .onnx file, metadata extras) of the detector, dynamic batch."""
  from importlib import metadata

  model, d = _append_postprocess(network_model(detector, variables), detector)
  size = detector.image_size
  extras = {
      "opset": OPSET,
      "jax2onnx_version": metadata.version("jax2onnx"),
      "inputs": {"images": ["b", *size, 3, "float32 RGB in [0, 1], resized to the model size"]},
      "outputs": {"boxes": f"[b, {d}, 4] float32 (x1, y1, x2, y2) as fractions of the image width / height",
                  "scores": f"[b, {d}] float32", "labels": f"[b, {d}] int64: index into class_names",
                  "num": "[b] int64: valid detections, first"},
  }
  return model.SerializeToString(), extras
