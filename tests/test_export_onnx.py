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

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssdlite_jax import checkpoint, detect, porting, postprocess
from ssdlite_jax.cli import export as export_cli
from ssdlite_jax.export import onnx as onnx_export, with_overrides
from ssdlite_jax.loading import load_detector
from ssdlite_jax.models import build_model, default_model_config
from ssdlite_jax.models.layers import BatchNorm
from tests.helpers import import_or_skip, tiny_model_config
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


def test_onnx_nms_keeps_a_box_at_exactly_the_threshold():
  """ONNX's NonMaxSuppression (onnxruntime) suppresses IoU > thr only, as torchvision and postprocess.py: box 1
  lies inside box 0 with IoU 2 / 4 = 0.5 exactly, and stays."""
  h = onnx.helper
  node = h.make_node("NonMaxSuppression", ["boxes", "scores", "max", "iou", "score"], ["selected"])
  inits = [onnx.numpy_helper.from_array(np.array([3], np.int64), "max"),
           onnx.numpy_helper.from_array(np.array([0.5], np.float32), "iou"),
           onnx.numpy_helper.from_array(np.array([0.0], np.float32), "score")]
  graph = h.make_graph([node], "nms", [h.make_tensor_value_info("boxes", onnx.TensorProto.FLOAT, [1, 3, 4]),
                                       h.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, [1, 1, 3])],
                       [h.make_tensor_value_info("selected", onnx.TensorProto.INT64, [None, 3])], inits)
  model = h.make_model(graph, opset_imports=[h.make_opsetid("", onnx_export.OPSET)])
  boxes = np.array([[0, 0, 4, 1], [0, 0, 2, 1], [10, 10, 12, 12]], np.float32)
  scores = np.array([0.9, 0.8, 0.7], np.float32)
  selected, = _session(model).run(None, {"boxes": boxes[None], "scores": scores[None, None]})
  assert selected[:, 2].tolist() == [0, 1, 2]
  keep = postprocess.per_class_nms(jnp.asarray(boxes)[None], jnp.ones((1, 3), bool), 0.5)
  assert np.asarray(keep).tolist() == [[True, True, True]]


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


def test_onnx_full_size_ssdlite320_from_safetensors(tmp_path):
  """The full SSDlite320 (91 classes, 3.4 M parameters) as a port_weights .safetensors, through the CLI."""
  detector = build_model(default_model_config())
  images = smooth_images(2, 320, 320, seed=5)
  variables = _non_trivial_variables(detector, images, seed=1)
  weights = str(tmp_path / "ssdlite320.safetensors")
  porting.save_state_dict(porting.flax_to_torch(variables, detector), weights)
  out = str(tmp_path / "ssdlite320.onnx")
  export_cli.main(["--torch-weights", weights, "--format", "onnx", "--out", out, "--max-detections", "200"])
  got = _session(open(out, "rb").read()).run(None, {"images": images})
  assert got[0].shape == (2, 200, 4)
  detector, variables, _ = load_detector(weights)
  reference = jax.device_get(detect.make_detect_fn(detector)(variables, images, SIZES[1:]))
  _assert_same_detections(got, reference, SIZES[1:])
  assert (got[3] == 200).all()
  assert json.load(open(out + ".json"))["source"] == weights
