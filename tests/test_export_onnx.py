"""export.py --format onnx on onnxruntime (CPUExecutionProvider) against the Predictor's detect function on the same
resized inputs: a narrow 128 px model (batch 3, raw outputs of the JAX part, dynamic batch), the full SSDlite320
from a .safetensors through the CLI, nothing above the threshold, NonMaxSuppression's IoU tie, failures.

Needs the venv of requirements-onnx.txt (jax2onnx, onnxruntime; no torch or TensorFlow), so the random weights are
drawn here as torchvision draws them (tests/torch_reference.py in torch), with BN statistics of the test images.
Collected only under -m onnx (tests/conftest.py): pytest -m onnx tests/test_export_onnx.py.
"""

import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssdlite_jax import checkpoint, detect, nms, porting
from ssdlite_jax.cli import export as export_cli
from ssdlite_jax.export import onnx as onnx_export, with_overrides
from ssdlite_jax.loading import load_detector
from ssdlite_jax.zoo import build_model
from ssdlite_jax.ssd.configs import ssdlite320_config, ssd300_vgg16_config
from ssdlite_jax.models.layers import BatchNorm
from tests import selection_cases
from tests.helpers import assert_same_detections, import_or_skip, tiny_model_config
from tests.torch_reference import smooth_images

ort = import_or_skip("onnxruntime")   # under CI=true a missing package fails instead of skipping
onnx = import_or_skip("onnx")

pytestmark = pytest.mark.onnx

SIZES = np.array([[320, 320], [240, 300], [480, 640]], np.int32)   # (h, w) before the resize


def _non_trivial_variables(detector, images, seed=0):
  """Random weights as torchvision initialises SSDlite (kaiming-normal fan-out backbone, N(0, 0.03) heads) with
  random BN affine parameters and running statistics of a train-mode pass over `images` (from zeroed ones, so
  dividing by 1 - momentum gives the batch statistics) times U(1, 1.5) on the variance, as
  tests/torch_reference.py does in torch: non-degenerate feature maps, spread-out scores."""
  rng = np.random.RandomState(seed)

  def draw(path, x):
    name = jax.tree_util.keystr(path)
    if x.ndim == 4:
      std = 0.03 if "_head" in name else np.sqrt(2.0 / (x.shape[0] * x.shape[1] * x.shape[3]))
      return rng.normal(0.0, std, x.shape).astype(x.dtype)
    if "['bn']" in name:
      return rng.uniform(0.5, 1.0, x.shape).astype(x.dtype) if "scale" in name else \
          rng.uniform(-0.5, 0.5, x.shape).astype(x.dtype)
    return np.zeros_like(x)

  variables = jax.device_get(detector.init(jax.random.key(seed)))
  params = jax.tree_util.tree_map_with_path(draw, variables["params"])
  zeroed = jax.tree.map(np.zeros_like, variables["batch_stats"])
  _, updated = jax.jit(lambda v: detector.module.apply(v, images, train=True, mutable=["batch_stats"]))(
      {"params": params, "batch_stats": zeroed})
  stats = jax.tree_util.tree_map_with_path(
      lambda p, x: x if x.dtype.kind == "i" else x / (1 - BatchNorm.momentum)
      * (rng.uniform(1.0, 1.5, x.shape).astype(x.dtype) if "var" in jax.tree_util.keystr(p) else 1),
      jax.device_get(updated["batch_stats"]))
  return {"params": params, "batch_stats": stats}


def _session(model):
  data = model if isinstance(model, bytes) else model.SerializeToString()
  return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _assert_same_detections(got, reference, sizes):
  """ONNX outputs (boxes as fractions) against the Predictor's (boxes in original pixels of `sizes`)."""
  boxes, scores, labels, num = got
  for i, (h, w) in enumerate(sizes):
    n = int(reference["valid"][i][:scores.shape[1]].sum())
    assert n > 0 and int(num[i]) == n
    np.testing.assert_array_equal(labels[i][:n], reference["labels"][i][:n])
    np.testing.assert_allclose(scores[i][:n], reference["scores"][i][:n], atol=1e-5)
    np.testing.assert_allclose(boxes[i][:n] * [w, h, w, h], reference["boxes"][i][:n], atol=1e-3 * max(h, w))
    assert not scores[i][n:].any() and not labels[i][n:].any() and not boxes[i][n:].any()
    assert len(np.unique(scores[i][:n])) > 0.9 * n   # scores that do not tie: the order is tested


@pytest.fixture(scope="module")
def narrow():
  detector = with_overrides(build_model(tiny_model_config()), onnx_export.KERNELS)
  images = smooth_images(3, 128, 128, seed=11)
  variables = _non_trivial_variables(detector, images)
  data, extras = onnx_export.export(detector, variables)
  return detector, variables, data, extras, images


def test_onnx_equals_the_predictor_detect_fn(narrow):
  detector, variables, data, extras, images = narrow
  model = onnx.load_from_string(data)
  assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 13
  assert "NonMaxSuppression" in {n.op_type for n in model.graph.node}
  assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param   # a dynamic batch dimension
  session = _session(data)
  got = session.run(None, {"images": images})
  assert [o.name for o in session.get_outputs()] == list(onnx_export.OUTPUTS) == list(extras["outputs"])
  assert [a.shape for a in got] == [(3, 300, 4), (3, 300), (3, 300), (3,)] and got[2].dtype == np.int64
  reference = jax.device_get(detect.make_detect_fn(detector)(variables, images, SIZES))
  _assert_same_detections(got, reference, SIZES)
  assert len({tuple(s[:5]) for s in got[1]}) == 3   # three different images
  one = session.run(None, {"images": images[1:2]})
  for a, b in zip(one, got):
    np.testing.assert_array_equal(a[0], b[1])


def test_onnx_raw_outputs_of_the_jax_part(narrow):
  """The jax2onnx part (network, decoded boxes, softmax) within 1e-5 relative of JAX, read as extra outputs."""
  detector, variables, data, _, images = narrow
  model = onnx.load_from_string(data)
  del model.graph.output[:]
  model.graph.output.extend([onnx.helper.make_empty_tensor_value_info(n) for n in ("boxes_all", "scores_all")])
  boxes, scores = _session(model).run(None, {"images": images})
  ref_boxes, ref_scores = jax.device_get(onnx_export._network_scores_and_boxes(detector, variables)(images))
  np.testing.assert_allclose(boxes, ref_boxes, rtol=1e-5, atol=1e-5 * np.abs(ref_boxes).max())
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5 * np.abs(ref_scores).max())


def test_onnx_nms_decides_iou_ties_as_torchvision_given_the_graphs_threshold():
  """ONNX's NonMaxSuppression (onnxruntime) suppresses at IoU > its float32 threshold; torchvision's kernel at
  float32 IoU > the float64 threshold (tests/test_export.py checks torchvision on the same boxes): at 0.5 both keep
  an IoU of exactly 0.5, at 0.55 torchvision suppresses an IoU of float32(0.55) > 0.55, which onnxruntime keeps at
  float32(0.55) and suppresses at the graph's nms.float32_iou_threshold(0.55)."""
  h = onnx.helper
  node = h.make_node("NonMaxSuppression", ["boxes", "scores", "max", "iou", "score"], ["selected"])
  inits = [onnx.numpy_helper.from_array(np.array([3], np.int64), "max"),
           onnx.numpy_helper.from_array(np.array([0.0], np.float32), "score")]
  graph = h.make_graph([node], "nms", [h.make_tensor_value_info("boxes", onnx.TensorProto.FLOAT, [1, 3, 4]),
                                       h.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, [1, 1, 3]),
                                       h.make_tensor_value_info("iou", onnx.TensorProto.FLOAT, [1])],
                       [h.make_tensor_value_info("selected", onnx.TensorProto.INT64, [None, 3])], inits)
  session = _session(h.make_model(graph, opset_imports=[h.make_opsetid("", onnx_export.OPSET)]))
  scores = np.array([[[0.9, 0.8, 0.7]]], np.float32)
  for thr, inner, torchvision_keeps in ((0.5, 10.0, [0, 1, 2]), (0.55, 11.0, [0, 2])):
    boxes = np.array([[0, 0, 20, 1], [0, 0, inner, 1], [30, 30, 32, 32]], np.float32)   # IoU inner / 20
    run = lambda t: session.run(None, {"boxes": boxes[None], "scores": scores, "iou": np.array([t], np.float32)}
                                )[0][:, 2].tolist()
    assert run(thr) == [0, 1, 2]
    assert run(nms.float32_iou_threshold(thr)) == torchvision_keeps
    keep = nms.per_class_nms(jnp.asarray(boxes)[None], jnp.ones((1, 3), bool), thr)
    assert np.flatnonzero(np.asarray(keep)[0]).tolist() == torchvision_keeps


@pytest.mark.parametrize("name", list(selection_cases.CONFIGS))
def test_onnx_selection_equals_the_predictor(name):
  """The post-processing ops alone, fed the Predictor's boxes and softmax, on the cases built where a selection
  breaks (tests/selection_cases.py: zero-area boxes on every border, identical boxes in several classes, IoUs at
  exactly the threshold, score ties, fewer detections than D, none), all cases as one batch: every slot equals
  postprocess.select's."""
  num_classes, anchors, _, _, _ = selection_cases.CONFIGS[name]
  h = onnx.helper
  inputs = [h.make_tensor_value_info("boxes_all", onnx.TensorProto.FLOAT, ["b", anchors, 4]),
            h.make_tensor_value_info("scores_all", onnx.TensorProto.FLOAT, ["b", num_classes - 1, anchors])]
  model = h.make_model(h.make_graph([], "selection", inputs, []),
                       opset_imports=[h.make_opsetid("", onnx_export.OPSET)], ir_version=9)
  # image_size (1, 1): the boxes come out in model px, as postprocess.select gives them.
  detector = types.SimpleNamespace(config=selection_cases.config(name), image_size=(1, 1),
                                   anchors=np.zeros((anchors, 4), np.float32))
  model, _ = onnx_export._append_postprocess(model, detector)
  cases = selection_cases.CASES[name]
  boxes = np.stack([b for b, _ in cases.values()])
  scores = np.swapaxes(jax.device_get(jax.nn.softmax(np.stack([lg for _, lg in cases.values()]), -1))[..., 1:], 1, 2)
  got = _session(model).run(None, {"boxes_all": boxes, "scores_all": np.ascontiguousarray(scores)})
  for i, case in enumerate(cases):
    out = {"boxes": got[0][i], "scores": got[1][i], "labels": got[2][i], "valid": np.arange(len(got[1][i])) < got[3][i]}
    selection_cases.assert_same_selection(out, selection_cases.predictor_selection(name, case), f"{name} {case}")


@pytest.fixture(scope="module")
def narrow_checkpoint(tmp_path_factory):
  """A narrow model at init, as an orbax checkpoint: every score is about 1 / K = 0.25."""
  config = tiny_model_config()
  path = str(tmp_path_factory.mktemp("onnx_ckpt") / "ckpt")
  checkpoint.save_variables(path, 3, build_model(config).init(jax.random.key(0)), config)
  return path


def test_onnx_cli_from_a_checkpoint_with_nothing_above_the_threshold(narrow_checkpoint, tmp_path):
  out = str(tmp_path / "narrow.onnx")
  export_cli.main(["--checkpoint", narrow_checkpoint, "--format", "onnx", "--out", out, "--score-thresh", "0.5",
                   "--max-detections", "20"])
  assert sorted(os.listdir(tmp_path)) == ["narrow.onnx", "narrow.onnx.json"]
  boxes, scores, labels, num = _session(open(out, "rb").read()).run(None, {"images": smooth_images(2, 128, 128)})
  assert boxes.shape == (2, 20, 4) and num.tolist() == [0, 0]
  assert not boxes.any() and not scores.any() and not labels.any()
  meta = json.load(open(out + ".json"))
  assert meta["format"] == "onnx" and meta["source"].endswith("ckpt (step 3)") and meta["opset"] >= 13
  assert meta["postprocess"]["score_thresh"] == 0.5 and meta["postprocess"]["detections_per_img"] == 20
  assert list(meta["outputs"]) == ["boxes", "scores", "labels", "num"] and meta["inputs"]["images"][0] == "b"


def test_a_failed_onnx_conversion_leaves_no_file(narrow_checkpoint, tmp_path, monkeypatch):
  out = str(tmp_path / "x.onnx")

  def fail(*_):
    raise ValueError("conversion failed")
  with monkeypatch.context() as m:
    m.setattr(onnx_export, "network_model", fail)
    with pytest.raises(SystemExit, match="conversion failed"):
      export_cli.main(["--checkpoint", narrow_checkpoint, "--format", "onnx", "--out", out])
  with monkeypatch.context() as m:
    m.setitem(sys.modules, "jax2onnx", None)   # as if not installed
    with pytest.raises(SystemExit, match=r"needs jax2onnx: pip install -r requirements-onnx.txt"):
      export_cli.main(["--checkpoint", narrow_checkpoint, "--format", "onnx", "--out", out])
  assert os.listdir(tmp_path) == []


def _assert_one_to_one(got, reference, i, size):
  """One image's ONNX outputs (boxes [D, 4] fractions, scores, labels, num) against the Predictor's detections of
  image i of original (h, w) = size: the same number, every one one to one (order free only among scores equal to
  float rounding; scores within 1e-5, boxes within 1e-3 of the size), sorted by score, zeros after."""
  boxes, scores, labels, num = got
  h, w = size
  n = int(reference["valid"][i].sum())
  assert int(num) == n
  assert not scores[n:].any() and not labels[n:].any() and not boxes[n:].any()
  assert (np.diff(scores[:n]) <= 1e-6).all()
  np.testing.assert_allclose(scores[:n], reference["scores"][i][:n], atol=1e-5)
  assert_same_detections((boxes[:n] * [w, h, w, h], list(labels[:n]), scores[:n]),
                         (reference["boxes"][i][:n], list(reference["labels"][i][:n]), reference["scores"][i][:n]),
                         score_atol=1e-5, box_atol=1e-3 * max(h, w))


@pytest.mark.parametrize("num_classes", [2, 91])
def test_onnx_full_size_ssdlite320_with_zero_area_boxes(num_classes, tmp_path):
  """The full SSDlite320 (3.4 M parameters at 91 classes) as a port_weights .safetensors, through the CLI, with the
  box regression's last convolutions x 80: boxes fly past the borders and clip to zero width or height (at least
  a fifth of the detections), ties included. Every detection equals the Predictor's, one to one (order free
  only among scores equal to float rounding); at 2 classes fewer than D survive the NMS."""
  config = ssdlite320_config()
  config.num_classes = num_classes
  detector = build_model(config)
  images = smooth_images(2, 320, 320, seed=5)
  variables = _non_trivial_variables(detector, images, seed=1)
  variables["params"] = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 80 if "regression_head" in jax.tree_util.keystr(p) and "_proj" in jax.tree_util.keystr(p)
      and x.ndim == 4 else x, variables["params"])
  weights = str(tmp_path / "ssdlite320.safetensors")
  porting.save_state_dict(porting.flax_to_torch(variables, detector), weights)
  out = str(tmp_path / "ssdlite320.onnx")
  export_cli.main(["--torch-weights", weights, "--format", "onnx", "--out", out])
  boxes, scores, labels, num = _session(open(out, "rb").read()).run(None, {"images": images})
  assert boxes.shape == (2, 300, 4)
  detector, variables, _ = load_detector(weights)
  reference = jax.device_get(detect.make_detect_fn(detector)(variables, images, SIZES[1:]))
  for i, (h, w) in enumerate(SIZES[1:]):
    n = int(reference["valid"][i].sum())
    assert int(num[i]) == n and (n < 300) == (num_classes == 2), (n, num_classes)
    ref_boxes = reference["boxes"][i][:n]
    area = (ref_boxes[:, 2] - ref_boxes[:, 0]) * (ref_boxes[:, 3] - ref_boxes[:, 1])
    assert (area == 0).sum() >= n // 5, (area == 0).sum()
    _assert_one_to_one((boxes[i], scores[i], labels[i], num[i]), reference, i, (h, w))
  assert json.load(open(out + ".json"))["source"] == weights


def test_onnx_ssd300_vgg16_equals_the_predictor(tmp_path):
  """SSD300-VGG16 (35.6 M parameters: a 143 MB .onnx) from a checkpoint of its initialisation: VGG's ceil-mode and
  padded max pools (an explicit -inf Pad and a VALID pool, the form jax2onnx converts), L2Norm and dilated
  convolution; all 200 detections (SSD300's D) of a 300 x 300 image equal the Predictor's, one to one."""
  config = ssd300_vgg16_config()
  path = str(tmp_path / "ckpt")
  checkpoint.save_variables(path, 0, build_model(config).init(jax.random.key(0)), config)
  out = str(tmp_path / "ssd300.onnx")
  export_cli.main(["--checkpoint", path, "--format", "onnx", "--out", out])
  image = smooth_images(1, 300, 300, seed=8)
  session = _session(open(out, "rb").read())
  assert "MaxPool" in {n.op_type for n in onnx.load(out).graph.node}
  boxes, scores, labels, num = session.run(None, {"images": image})
  detector, variables, _ = load_detector(path)
  reference = jax.device_get(detect.make_detect_fn(detector)(variables, image, np.array([[300, 300]], np.int32)))
  _assert_one_to_one((boxes[0], scores[0], labels[0], num[0]), reference, 0, (300, 300))
  assert int(num[0]) == 200
