"""export.py: each format's detections against the Predictor's detect function on the same resized inputs, the
file's metadata, and bad input. StableHLO: the full SSDlite320 through the CLI, batch-polymorphic, and the file
run bit-exact in a venv that has only jax and jaxlib. TFLite: the full SSDlite320 on the LiteRT interpreter,
builtin ops only, MediaPipe's output order; the zero-area case (the box regression scaled until half the boxes clip
to zero area) at 2, 11 and 91 classes on LiteRT, MediaPipe, the SavedModel and the StableHLO file, every detection
one to one; SSD300-VGG16 on LiteRT. The selection alone on built cases: test_export_selection.py."""

import io
import json
import os
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssdlite_jax import checkpoint, detect, nms, porting
from ssdlite_jax.cli import export as export_cli
from ssdlite_jax.loading import load_detector
from ssdlite_jax.zoo import build_model
from ssdlite_jax.ssd.configs import ssd300_vgg16_config
from tests.helpers import assert_same_detections, import_or_skip, tiny_model_config
from tests.torch_reference import random_torchvision_ssdlite, smooth_images, state_dict_numpy

SIZES = np.array([[320, 320], [240, 300], [480, 640]], np.int32)   # (h, w) before the resize


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("export") / "ssdlite320.safetensors")
  porting.save_state_dict(state_dict_numpy(random_torchvision_ssdlite(seed=4)), path)
  return path


@pytest.fixture(scope="module")
def stablehlo_file(weights, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("export") / "ssdlite320.jaxexport")
  export_cli.main(["--torch-weights", weights, "--format", "stablehlo", "--out", out, "--max-detections", "200"])
  return out


def _deserialize(path):
  with open(path, "rb") as f:
    return jax.export.deserialize(bytearray(f.read()))


def _images(n, size=320):
  return smooth_images(n, size, size, seed=11)


@pytest.mark.torch
def test_stablehlo_equals_the_predictor_detect_fn(weights, stablehlo_file):
  detector, variables, _ = load_detector(weights)
  reference = jax.device_get(detect.make_detect_fn(detector)(variables, _images(3), SIZES))
  got = jax.device_get(_deserialize(stablehlo_file).call(_images(3), SIZES))
  assert got["boxes"].shape == (3, 200, 4)   # --max-detections
  for i in range(3):
    n = int(reference["valid"][i][:200].sum())
    assert n == int(got["valid"][i].sum()) == 200
    np.testing.assert_array_equal(got["labels"][i][:n], reference["labels"][i][:n])
    np.testing.assert_allclose(got["scores"][i][:n], reference["scores"][i][:n], atol=1e-5)
    np.testing.assert_allclose(got["boxes"][i][:n], reference["boxes"][i][:n], atol=1e-3 * SIZES[i].max())
  with open(stablehlo_file + ".json") as f:
    meta = json.load(f)
  assert meta["format"] == "stablehlo" and meta["postprocess"]["detections_per_img"] == 200
  assert meta["postprocess"]["score_thresh"] == 0.001 and meta["model"]["num_classes"] == 91
  assert meta["model"]["image_size"] == [320, 320] and set(meta["platforms"]) == {"cpu", "cuda"}


@pytest.mark.torch
def test_stablehlo_batch_of_one_and_no_detection_above_the_threshold(weights, tmp_path):
  out = str(tmp_path / "strict.jaxexport")
  export_cli.main(["--torch-weights", weights, "--format", "stablehlo", "--out", out, "--score-thresh", "0.9999",
                   "--max-detections", "10"])
  # Random weights give softmax scores far below 0.9999: every slot invalid, not an error.
  dets = jax.device_get(_deserialize(out).call(_images(1), SIZES[:1]))
  assert dets["valid"].shape == (1, 10) and not dets["valid"].any()
  assert json.load(open(out + ".json"))["postprocess"]["score_thresh"] == 0.9999


def _jax_only_site(directory):
  """A site directory holding only jax, jaxlib, flatbuffers and what they require, as links to this
  interpreter's installed distributions (no network, no pip): what `pip install jax jaxlib flatbuffers` gives."""
  import importlib.metadata as md
  import re
  names, todo = set(), ["jax", "jaxlib", "flatbuffers"]
  while todo:
    name = todo.pop()
    if name.lower() in names:
      continue
    names.add(name.lower())
    todo += [re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0] for r in md.requires(name) or [] if ";" not in r]
  os.makedirs(directory)
  for name in names:
    dist = md.distribution(name)
    for top in {f.parts[0] for f in dist.files if f.parts[0] != ".."}:
      os.symlink(dist.locate_file(top), os.path.join(directory, top))
  return sorted(names)


@pytest.mark.torch
@pytest.mark.slow
def test_stablehlo_runs_bit_exact_with_only_jax_installed(stablehlo_file, tmp_path):
  site = str(tmp_path / "jax_only")
  assert _jax_only_site(site) == ["flatbuffers", "jax", "jaxlib", "ml_dtypes", "numpy", "opt_einsum", "scipy"]
  np.savez(tmp_path / "inputs.npz", images=_images(2), sizes=SIZES[:2])
  script = (
      "import sys; sys.path.insert(0, sys.argv[4])\n"
      "import importlib.util, jax, numpy as np\n"
      "assert all(importlib.util.find_spec(m) is None for m in ('ssdlite_jax', 'flax', 'torch', 'tensorflow'))\n"
      "exported = jax.export.deserialize(bytearray(open(sys.argv[1], 'rb').read()))\n"
      "x = np.load(sys.argv[2])\n"
      "np.savez(sys.argv[3], **jax.device_get(exported.call(x['images'], x['sizes'])))\n")
  # -I -S: no site-packages, user site, PYTHONPATH or working directory on the path; only the site above.
  subprocess.run([sys.executable, "-I", "-S", "-c", script, stablehlo_file, str(tmp_path / "inputs.npz"),
                  str(tmp_path / "out.npz"), site], check=True, cwd=str(tmp_path))
  there = np.load(tmp_path / "out.npz")
  here = jax.device_get(_deserialize(stablehlo_file).call(_images(2), SIZES[:2]))
  for k in ("boxes", "scores", "labels", "valid"):
    np.testing.assert_array_equal(there[k], here[k], err_msg=k)


@pytest.mark.torch
def test_bad_input_is_named_and_leaves_no_file(weights, tmp_path, capsys):
  out = tmp_path / "x.jaxexport"
  with pytest.raises(SystemExit) as e:
    export_cli.main(["--torch-weights", weights, "--format", "tflite9", "--out", str(out)])
  assert e.value.code == 2 and "--format: invalid choice: 'tflite9'" in capsys.readouterr().err
  with pytest.raises(SystemExit, match="--image-size=8: must be >= 32"):
    export_cli.main(["--torch-weights", weights, "--format", "stablehlo", "--out", str(out), "--image-size", "8"])
  with pytest.raises(SystemExit, match="missing.pth: no such checkpoint directory or weights file"):
    export_cli.main(["--torch-weights", str(tmp_path / "missing.pth"), "--format", "stablehlo", "--out", str(out)])
  other = {"backbone.features.0.weight": np.zeros((64, 3, 3, 3), np.float32)}
  porting.save_state_dict(other, str(tmp_path / "vgg.safetensors"))
  with pytest.raises(SystemExit, match="vgg.safetensors: the state_dict fits no known model variant"):
    export_cli.main(["--torch-weights", str(tmp_path / "vgg.safetensors"), "--format", "stablehlo", "--out", str(out)])
  assert sorted(os.listdir(tmp_path)) == ["vgg.safetensors"]


def _run_tflite(path, image):
  """The four outputs of a .tflite on the LiteRT interpreter for one image [S, S, 3], in the file's order."""
  interpreter_lib = import_or_skip("ai_edge_litert.interpreter")
  interpreter = interpreter_lib.Interpreter(model_path=path, num_threads=2)
  interpreter.allocate_tensors()
  interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image[None])
  interpreter.invoke()
  outputs = [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]
  return outputs, {op["op_name"] for op in interpreter._get_ops_details()}


@pytest.fixture(scope="module")
def tflite_file(weights, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("export") / "ssdlite320.tflite")
  export_cli.main(["--torch-weights", weights, "--format", "tflite", "--out", out])
  return out


@pytest.mark.tf
@pytest.mark.torch
def test_tflite_equals_the_predictor_detect_fn(weights, tflite_file):
  out = tflite_file
  detector, variables, _ = load_detector(weights)
  size = np.array([240, 300], np.int32)
  image = _images(1)[0]
  (boxes, classes, scores, num), ops = _run_tflite(out, image)
  assert [a.shape for a in (boxes, classes, scores, num)] == [(1, 300, 4), (1, 300), (1, 300), (1,)]
  assert "NON_MAX_SUPPRESSION_V5" in ops and "TOPK_V2" in ops
  assert not {op for op in ops if op.startswith(("CUSTOM", "Flex", "FLEX"))}, ops
  reference = jax.device_get(detect.make_detect_fn(detector)(variables, image[None], size[None]))
  n = int(reference["valid"][0].sum())
  assert n == int(num[0]) == 300
  np.testing.assert_array_equal(classes[0][:n].astype(np.int64) + 1, reference["labels"][0][:n])
  np.testing.assert_allclose(scores[0][:n], reference["scores"][0][:n], atol=1e-5)
  # ymin, xmin, ymax, xmax as fractions -> xyxy pixels of the original (h, w) = (240, 300) image.
  xyxy = boxes[0][:n][:, [1, 0, 3, 2]] * [size[1], size[0], size[1], size[0]]
  np.testing.assert_allclose(xyxy, reference["boxes"][0][:n], atol=1e-3 * size.max())
  meta = json.load(open(out + ".json"))
  assert meta["format"] == "tflite" and list(meta["outputs"]) == ["boxes", "classes", "scores", "num"]


def _mediapipe_detect(path, images, score_threshold):
  """MediaPipe Tasks' ObjectDetector on the file, unchanged, every result (max_results=-1) above `score_threshold`
  (None: no threshold): per uint8 image, (boxes [n, 4] xyxy pixels, label names [n], scores [n]) by decreasing
  score, one row per category (MediaPipe merges detections of one box into a
  detection with several categories; its boxes are whole pixels: origin and size)."""
  mp = import_or_skip("mediapipe")
  from mediapipe.tasks.python import BaseOptions, vision
  threshold = {} if score_threshold is None else {"score_threshold": score_threshold}
  options = vision.ObjectDetectorOptions(base_options=BaseOptions(model_asset_path=path), max_results=-1, **threshold)
  out = []
  with vision.ObjectDetector.create_from_options(options) as detector:
    for image in images:
      rows = [((b.origin_x, b.origin_y, b.origin_x + b.width, b.origin_y + b.height), c.category_name, c.score)
              for d in detector.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=image)).detections
              for b in [d.bounding_box] for c in d.categories]
      rows.sort(key=lambda r: -r[2])
      out.append((np.array([r[0] for r in rows], np.float64).reshape(-1, 4), [r[1] for r in rows],
                  np.array([r[2] for r in rows], np.float32)))
  return out


def _iou(a, b):
  """IoU [len(a), len(b)] of xyxy boxes."""
  lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
  area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)
  return inter / (area(a)[:, None] + area(b)[None] - inter)


@pytest.mark.tf
@pytest.mark.torch
def test_mediapipe_object_detector_runs_the_tflite_file(weights, tflite_file):
  """The exported file as MediaPipe's ObjectDetector reads it (its metadata: input normalisation, the four
  outputs by name, labels.txt) gives the Predictor's detections above its score threshold. At the model size
  the input is the same and so are the detections; other sizes are resized by MediaPipe's own sampling (it
  stretches, as the Predictor, but samples elsewhere), so there its best detections match the Predictor's."""
  from ssdlite_jax.inference import Predictor
  predictor = Predictor.from_torch(weights)
  images = [(smooth_images(1, h, w, seed=21 + i)[0] * 255).round().astype(np.uint8) for i, (h, w) in enumerate(SIZES)]
  threshold = 0.02   # random weights: about 15 of the 300 detections per image
  for k, ((boxes, names, scores), ref) in enumerate(zip(_mediapipe_detect(tflite_file, images, threshold),
                                                        predictor(images))):
    keep = ref["scores"] >= threshold
    ref_names = [predictor.class_names[label] for label in ref["labels"][keep]]
    if k == 0:   # 320 x 320: no resize
      assert len(names) > 10
      # boxes: MediaPipe rounds origin and size to whole pixels
      assert_same_detections((boxes, names, scores), (ref["boxes"][keep], ref_names, ref["scores"][keep]),
                              score_atol=1e-5, box_atol=2.0)
    else:
      assert abs(len(names) - int(keep.sum())) <= 0.3 * keep.sum()
      iou = _iou(boxes[:5], ref["boxes"][keep])
      for i in range(5):
        same = (iou[i] > 0.9) & (np.array(ref_names) == names[i])
        assert same.any() and np.abs(ref["scores"][keep][same] - scores[i]).min() < 1e-3, (k, i)
  with open(tflite_file, "rb") as f:
    data = f.read()
  assert zipfile.ZipFile(io.BytesIO(data)).read("labels.txt").decode().split("\n") == list(predictor.class_names[1:])
  from mediapipe.tasks.metadata import metadata_schema_py_generated as metadata_fb, schema_py_generated as schema_fb
  model = schema_fb.Model.GetRootAsModel(data, 0)
  buffer, = [model.Buffers(model.Metadata(i).Buffer()).DataAsNumpy().tobytes() for i in range(model.MetadataLength())
             if model.Metadata(i).Name() == b"TFLITE_METADATA"]
  subgraph = metadata_fb.ModelMetadata.GetRootAsModelMetadata(buffer, 0).SubgraphMetadata(0)
  assert [subgraph.OutputTensorMetadata(i).Name() for i in range(4)] == [
      b"location", b"category", b"score", b"number of detections"]   # the file's output order
  # The schema's table (metadata_version.cc): output tensor groups came with 1.2.0, the rest with 1.0.0.
  assert metadata_fb.ModelMetadata.GetRootAsModelMetadata(buffer, 0).MinParserVersion() == b"1.2.0"


@pytest.mark.tf
def test_tflite_from_a_checkpoint_with_nothing_above_the_threshold(tmp_path):
  """A narrow 128 px model from an orbax checkpoint; at init every score is about 1/K, so a 0.5 threshold leaves
  no detection: num 0 and zeroed slots, not an error, in LiteRT and in MediaPipe."""
  config = tiny_model_config()
  detector = build_model(config)
  checkpoint.save_variables(str(tmp_path / "ckpt"), 3, detector.init(jax.random.key(0)), config)
  out = str(tmp_path / "narrow.tflite")
  export_cli.main(["--checkpoint", str(tmp_path / "ckpt"), "--format", "tflite", "--out", out,
                   "--score-thresh", "0.5", "--max-detections", "20"])
  image = _pixels(_images(1, 128))[0].astype(np.float32)
  (boxes, classes, scores, num), _ = _run_tflite(out, image)
  assert boxes.shape == (1, 20, 4) and num[0] == 0 and not scores.any() and not boxes.any()
  # MediaPipe's ObjectDetector, with no score threshold of its own, reads num = 0 as no detection.
  (mp_boxes, names, mp_scores), = _mediapipe_detect(out, [(image * 255).round().astype(np.uint8)], None)
  assert names == [] and len(mp_scores) == 0
  meta = json.load(open(out + ".json"))
  assert meta["source"].endswith("ckpt (step 3)") and meta["postprocess"]["score_thresh"] == 0.5


@pytest.mark.tf
@pytest.mark.torch
def test_litert_nms_decides_iou_ties_as_torchvision_given_the_graphs_threshold():
  """LiteRT's NON_MAX_SUPPRESSION_V5 suppresses at IoU >= its float32 threshold; torchvision's kernel at float32 IoU
  > the float64 threshold. So at 0.5 (exact in float32) the raw op suppresses an IoU of exactly 0.5 that torchvision
  keeps, and at 0.55 torchvision suppresses an IoU of float32(0.55) > 0.55. The threshold the tflite graph gives
  the op (nms.float32_iou_threshold(t, inclusive=True)) makes both decisions torchvision's."""
  tf = import_or_skip("tensorflow")
  torch = import_or_skip("torch")
  import torchvision
  interpreter_lib = import_or_skip("ai_edge_litert.interpreter")

  @tf.function(input_signature=[tf.TensorSpec([3, 4], tf.float32), tf.TensorSpec([3], tf.float32),
                                tf.TensorSpec([], tf.float32)], autograph=False)
  def tf_nms(boxes, scores, iou_threshold):
    selected, _, count = tf.raw_ops.NonMaxSuppressionV5(
        boxes=boxes, scores=scores, max_output_size=3, iou_threshold=iou_threshold, score_threshold=0.0,
        soft_nms_sigma=0.0, pad_to_max_output_size=True)
    return selected, count

  converter = tf.lite.TFLiteConverter.from_concrete_functions([tf_nms.get_concrete_function()], tf_nms)
  interpreter = interpreter_lib.Interpreter(model_content=converter.convert())
  interpreter.allocate_tensors()

  def litert(boxes, threshold):
    for d in interpreter.get_input_details():
      value = {2: boxes, 1: np.array([0.9, 0.8, 0.7], np.float32), 0: np.float32(threshold)}[len(d["shape"])]
      interpreter.set_tensor(d["index"], value)
    interpreter.invoke()
    selected, count = (interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details())
    return selected[:int(count)].tolist()

  for thr, inner in ((0.5, 10.0), (0.55, 11.0)):   # box 1 inside box 0: IoU inner / 20 = float32(thr)
    boxes = np.array([[0, 0, 20, 1], [0, 0, inner, 1], [30, 30, 32, 32]], np.float32)
    want = torchvision.ops.nms(torch.from_numpy(boxes), torch.tensor([0.9, 0.8, 0.7]), thr).tolist()
    assert want == ([0, 1, 2] if thr == 0.5 else [0, 2])
    assert litert(boxes, thr) == [0, 2]   # the raw op at the threshold itself
    assert litert(boxes, nms.float32_iou_threshold(thr, inclusive=True)) == want
    keep = nms.per_class_nms(jnp.asarray(boxes)[None], jnp.ones((1, 3), bool), thr)
    assert np.flatnonzero(np.asarray(keep)[0]).tolist() == want


@pytest.mark.tf
def test_tflite_int8_network_with_float_scores(train_cli, tmp_path, capsys):
  """tflite-int8 of a narrow model with realistic BN statistics and spread-out logits, calibrated on the
  synthetic train split: every convolution runs in int8, the scores, top-k and NMS stay float32 (scores not on
  an int8 grid), and the detections stay close to the float32 file's on the calibration images."""
  config = tiny_model_config()
  detector = build_model(config)
  from ssdlite_jax.data import config as data_config_lib, pipeline
  cfg = data_config_lib.default_data_config()
  cfg.update(data_dir=train_cli["data_dir"], synthetic_num_train=24, synthetic_num_val=6)
  pixels = pipeline.calibration_images(pipeline.open_source(cfg), 8, (128, 128))
  variables = jax.device_get(detector.init(jax.random.key(0)))
  # Fresh running statistics shrink every map to ~1e-17: 30 train-mode passes over the calibration images move
  # them to the features' own; classification kernels x 30 then spread the scores (at init each is ~1/K).
  images = pixels.astype(np.float32) / 255
  stats = jax.jit(lambda v: detector.module.apply(v, images, train=True, mutable=["batch_stats"])[1])
  for _ in range(30):
    variables = {"params": variables["params"], **jax.device_get(stats(variables))}
  variables["params"] = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 30 if "classification_head" in jax.tree_util.keystr(p) and x.ndim == 4 else x,
      variables["params"])
  checkpoint.save_variables(str(tmp_path / "ckpt"), 1, variables, config)
  data_config = tmp_path / "calibration_config.py"
  data_config.write_text(
      "from configs import synthetic\n\n\ndef get_config():\n  c = synthetic.get_config()\n"
      f"  c.data.update(data_dir={train_cli['data_dir']!r}, synthetic_num_train=24, synthetic_num_val=6)\n"
      "  return c\n")
  with pytest.raises(SystemExit):
    export_cli.main(["--checkpoint", str(tmp_path / "ckpt"), "--format", "tflite-int8", "--out", "x.tflite"])
  assert "--calibration-data is needed for --format tflite-int8" in capsys.readouterr().err
  files = {}
  for fmt in ("tflite", "tflite-int8"):
    files[fmt] = str(tmp_path / f"{fmt}.tflite")
    extra = ["--calibration-data", str(data_config), "--calibration-images", "16"] if fmt == "tflite-int8" else []
    export_cli.main(["--checkpoint", str(tmp_path / "ckpt"), "--format", fmt, "--out", files[fmt], *extra])
  interpreter_lib = import_or_skip("ai_edge_litert.interpreter")
  interpreter = interpreter_lib.Interpreter(model_path=files["tflite-int8"])
  interpreter.allocate_tensors()
  tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
  dtypes = {}
  for op in interpreter._get_ops_details():
    dtypes.setdefault(op["op_name"], set()).update(tensors[i]["dtype"].__name__ for i in op["outputs"])
  assert dtypes["CONV_2D"] == dtypes["DEPTHWISE_CONV_2D"] == {"int8"}, dtypes
  assert "SOFTMAX" not in dtypes and dtypes["EXP"] == {"float32"}
  assert dtypes["TOPK_V2"] == dtypes["NON_MAX_SUPPRESSION_V5"] == {"float32", "int32"}
  assert dtypes["SCATTER_ND"] == {"float32"}
  assert interpreter.get_input_details()[0]["dtype"] == np.uint8
  meta = json.load(open(files["tflite-int8"] + ".json"))
  assert meta["format"] == "tflite-int8" and meta["calibration"].startswith("16 train images of")
  assert len({image.tobytes() for image in pixels}) == len(pixels)
  gaps = []
  for image in pixels[:4]:
    (_, _, float_scores, _), _ = _run_tflite(files["tflite"], image.astype(np.float32) / 255)
    (_, _, int8_scores, _), _ = _run_tflite(files["tflite-int8"], image)
    grid = np.abs(int8_scores * 256 - np.round(int8_scores * 256))
    assert grid.max() > 1e-3, "scores on a 1/256 grid: quantised"
    gaps.append(np.abs(int8_scores[0][:20] - float_scores[0][:20]).max())
  # Measured: 0.136 on each image (a random quarter-width net with logits scaled up; bench/export.py measures
  # the mAP change of a trained model). Scores collapsed onto int8 steps would be off by far more.
  assert max(gaps) <= 0.25, gaps
  # MediaPipe runs the int8 file as well (uint8 input, no normalisation): at the model size, LiteRT's detections.
  (boxes, names, scores), = _mediapipe_detect(files["tflite-int8"], pixels[:1], 0.3)
  (lite_boxes, lite_classes, lite_scores, _), _ = _run_tflite(files["tflite-int8"], pixels[0])
  keep = lite_scores[0] >= 0.3
  assert_same_detections(
      (boxes, names, scores),
      (lite_boxes[0][keep][:, [1, 0, 3, 2]] * 128, [str(int(c) + 1) for c in lite_classes[0][keep]],  # labels.txt
       lite_scores[0][keep]), score_atol=1e-6, box_atol=2.0)


def adversarial_weights(path, num_classes, seed):
  """SSDlite320 as torchvision initialises it at `num_classes`, with the box regression's last convolutions x 15:
  boxes fly past the borders and clip to zero width or height (about half of the 300 detections), as the boxes
  of a trained model do at the borders, only more often."""
  state = state_dict_numpy(random_torchvision_ssdlite(num_classes=num_classes, seed=seed))
  for key in state:
    if key.startswith("head.regression_head.module_list.") and key.endswith(".1.weight"):
      state[key] = state[key] * 15
  porting.save_state_dict(state, str(path))
  return str(path)


def _pixels(images):
  """float32 images [n, S, S, 3] on the uint8 grid: MediaPipe's input (pixels / 255) is then the same."""
  return (np.asarray(images) * 255).round() / 255


# num_classes: seed. At 2 classes fewer than D = 300 detections survive the NMS (num < D).
ADVERSARIAL = {2: 0, 11: 1, 91: 2}
ADVERSARIAL_IMAGES = _pixels(np.concatenate([smooth_images(2, 320, 320, seed=3), np.full((1, 320, 320, 3), 0.5)]))


@pytest.fixture(scope="module", params=sorted(ADVERSARIAL))
def adversarial(request, tmp_path_factory):
  """(weights, .tflite file, the Predictor's detections on ADVERSARIAL_IMAGES at the model size) per class count."""
  directory = tmp_path_factory.mktemp(f"adversarial{request.param}")
  weights = adversarial_weights(directory / "ssdlite.safetensors", request.param, ADVERSARIAL[request.param])
  out = str(directory / "ssdlite.tflite")
  export_cli.main(["--torch-weights", weights, "--format", "tflite", "--out", out])
  detector, variables, _ = load_detector(weights)
  sizes = np.full((len(ADVERSARIAL_IMAGES), 2), 320, np.int32)
  reference = jax.device_get(detect.make_detect_fn(detector)(variables, ADVERSARIAL_IMAGES.astype(np.float32), sizes))
  return weights, out, reference, detector.class_names


def _rows(boxes_xyxy, labels, scores, class_names):
  """(boxes [n, 4] xyxy px, names [n], scores [n]) as assert_same_detections reads them."""
  return np.asarray(boxes_xyxy, np.float64), [class_names[int(label)] for label in labels], np.asarray(scores)


def _assert_equals_the_predictor(got, reference, i, class_names, size=320):
  """The raw 4-tensor outputs (yxyx fractions) against the Predictor's detections of image i at the model size
  (square `size`): the same number, every one of them one to one (order free among scores equal to float
  rounding; boxes within 1e-3 of the size), sorted by score, zeros after."""
  boxes, classes, scores, num = (np.asarray(a)[0] for a in got)
  n = int(reference["valid"][i].sum())
  assert int(num) == n > 0
  assert not scores[n:].any() and not boxes[n:].any() and not classes[n:].any()
  assert (np.diff(scores[:n]) <= 1e-6).all()
  assert_same_detections(
      _rows(boxes[:n][:, [1, 0, 3, 2]] * size, classes[:n] + 1, scores[:n], class_names),
      _rows(reference["boxes"][i][:n], reference["labels"][i][:n], reference["scores"][i][:n], class_names),
      score_atol=1e-5, box_atol=1e-3 * size)


@pytest.mark.tf
@pytest.mark.torch
def test_tflite_equals_the_predictor_on_zero_area_boxes_and_ties(adversarial):
  """The issue's case (a zero-height box at the bottom border made LiteRT repeat it in every later slot) at 2, 11
  and 91 classes, on two images and a uniform one (many tied scores): every detection, one to one."""
  _, path, reference, class_names = adversarial
  boxes = reference["boxes"]
  zero_area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]) == 0) & reference["valid"]
  assert zero_area.sum(1).min() >= 20, zero_area.sum(1)   # the case is what it says
  for i, image in enumerate(ADVERSARIAL_IMAGES):
    got, _ = _run_tflite(path, image.astype(np.float32))
    _assert_equals_the_predictor(got, reference, i, class_names)


@pytest.mark.tf
@pytest.mark.torch
def test_mediapipe_reads_one_detection_per_row_for_every_num(adversarial):
  """MediaPipe's ObjectDetector (max_results=-1, no score threshold) on the same files and images (pixels, no
  resize) returns LiteRT's `num` rows one to one, each a detection of one class, for num = D and num < D (2 classes;
  num = 0: test_tflite_from_a_checkpoint_with_nothing_above_the_threshold)."""
  _, path, reference, class_names = adversarial
  pixels = (ADVERSARIAL_IMAGES * 255).round().astype(np.uint8)
  nums = []
  for i, (got, image) in enumerate(zip(_mediapipe_detect(path, pixels, None), ADVERSARIAL_IMAGES)):
    (boxes, classes, scores, num), _ = _run_tflite(path, image.astype(np.float32))
    n = int(num[0])
    nums.append(n)
    want = _rows(boxes[0][:n][:, [1, 0, 3, 2]] * 320, classes[0][:n] + 1, scores[0][:n], class_names)
    assert_same_detections(got, want, score_atol=1e-6, box_atol=2.0)   # whole pixels: origin and size
  assert (min(nums) < 300) == (len(class_names) == 2), nums


@pytest.mark.tf
@pytest.mark.torch
@pytest.mark.parametrize("adversarial", [2], indirect=True)
def test_saved_model_and_stablehlo_equal_the_predictor_on_zero_area_boxes(adversarial, tmp_path):
  """The other two formats on the 2-class adversarial case (half the boxes zero-area, num < D): TensorFlow's
  NonMaxSuppressionV5 (IoU > t) in the SavedModel, detect.detect in the StableHLO file (with the CPU kernels)."""
  tf = import_or_skip("tensorflow")
  weights, _, reference, class_names = adversarial
  images = ADVERSARIAL_IMAGES.astype(np.float32)
  saved = str(tmp_path / "saved_model")
  export_cli.main(["--torch-weights", weights, "--format", "saved_model", "--out", saved])
  serve = tf.saved_model.load(saved).signatures["serving_default"]
  for i, image in enumerate(images):
    got = {k: v.numpy() for k, v in serve(images=tf.constant(image[None])).items()}
    _assert_equals_the_predictor([got[k] for k in ("boxes", "classes", "scores", "num")], reference, i, class_names)
  stablehlo = str(tmp_path / "ssdlite.jaxexport")
  export_cli.main(["--torch-weights", weights, "--format", "stablehlo", "--out", stablehlo])
  got = jax.device_get(_deserialize(stablehlo).call(images, np.full((len(images), 2), 320, np.int32)))
  for i in range(len(images)):   # as the 4 tensors of the other formats (its kernels round otherwise)
    as_tensors = (got["boxes"][i:i + 1][..., [1, 0, 3, 2]] / 320, got["labels"][i:i + 1] - got["valid"][i:i + 1],
                  got["scores"][i:i + 1], got["valid"][i:i + 1].sum(1))
    _assert_equals_the_predictor(as_tensors, reference, i, class_names)


@pytest.mark.tf
def test_ssd300_vgg16_tflite_equals_the_predictor(tmp_path):
  """SSD300-VGG16 (35.6 M parameters: a 143 MB .tflite) from a checkpoint of its initialisation, on LiteRT against
  the Predictor on a 300 x 300 image: every one of the 200 detections (SSD300's D) one to one. VGG's ceil-mode and
  padded max pools, L2Norm and dilated convolution convert to LiteRT builtins. (The SavedModel is the same graph;
  its NMS: test_export_selection.py.)"""
  config = ssd300_vgg16_config()
  detector = build_model(config)
  checkpoint.save_variables(str(tmp_path / "ckpt"), 0, detector.init(jax.random.key(0)), config)
  detector, variables, _ = load_detector(str(tmp_path / "ckpt"))
  image = _pixels(smooth_images(1, 300, 300, seed=8)).astype(np.float32)
  reference = jax.device_get(detect.make_detect_fn(detector)(variables, image, np.array([[300, 300]], np.int32)))
  assert int(reference["valid"][0].sum()) == 200
  names = detector.class_names
  lite = str(tmp_path / "ssd300.tflite")
  export_cli.main(["--checkpoint", str(tmp_path / "ckpt"), "--format", "tflite", "--out", lite])
  got, ops = _run_tflite(lite, image[0])
  assert "MAX_POOL_2D" in ops and not {op for op in ops if op.startswith(("CUSTOM", "Flex", "FLEX"))}, ops
  _assert_equals_the_predictor(got, reference, 0, names, size=300)


@pytest.mark.tf
@pytest.mark.torch
def test_saved_model_equals_the_predictor_detect_fn(weights, tmp_path):
  """The SavedModel directory (TF Serving's serving_default signature) gives the Predictor's detections, named
  outputs in the TFLite layout; re-exporting over it replaces it whole."""
  tf = import_or_skip("tensorflow")
  out = str(tmp_path / "models" / "ssdlite" / "1")
  export_cli.main(["--torch-weights", weights, "--format", "saved_model", "--out", out, "--max-detections", "50"])
  export_cli.main(["--torch-weights", weights, "--format", "saved_model", "--out", out, "--max-detections", "100"])
  assert sorted(os.listdir(os.path.dirname(out))) == ["1", "1.json"]
  serve = tf.saved_model.load(out).signatures["serving_default"]
  image = _images(1)[0]
  got = {k: v.numpy() for k, v in serve(images=tf.constant(image[None])).items()}
  assert {k: v.shape for k, v in got.items()} == {"boxes": (1, 100, 4), "classes": (1, 100), "scores": (1, 100),
                                                  "num": (1,)}
  detector, variables, _ = load_detector(weights)
  size = np.array([480, 640], np.int32)
  reference = jax.device_get(detect.make_detect_fn(detector)(variables, image[None], size[None]))
  n = int(got["num"][0])
  assert n == 100 and int(reference["valid"][0][:100].sum()) == 100
  np.testing.assert_array_equal(got["classes"][0].astype(np.int64) + 1, reference["labels"][0][:n])
  np.testing.assert_allclose(got["scores"][0], reference["scores"][0][:n], atol=1e-5)
  xyxy = got["boxes"][0][:, [1, 0, 3, 2]] * [size[1], size[0], size[1], size[0]]
  np.testing.assert_allclose(xyxy, reference["boxes"][0][:n], atol=1e-3 * size.max())
  with open(out + ".json") as f:
    meta = json.load(f)
  assert meta["format"] == "saved_model" and meta["signature"] == "serving_default"
  assert meta["postprocess"]["detections_per_img"] == 100


def test_a_failed_directory_export_leaves_nothing(tmp_path):
  from ssdlite_jax import export as export_lib
  out = str(tmp_path / "model")

  def write(directory):
    os.makedirs(directory)
    open(os.path.join(directory, "saved_model.pb"), "w").close()
    raise ValueError("conversion failed")
  with pytest.raises(ValueError, match="conversion failed"):
    export_lib.write_directory_atomically(out, write, {"format": "saved_model"})
  assert os.listdir(tmp_path) == []
