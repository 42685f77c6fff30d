"""Faster R-CNN MobileNetV3-Large FPN end to end against live torchvision 0.29.1 (random weights, random BN
statistics, class biases spread so that detections pass the 0.05 score threshold): the transform, the proposals
per image and the final detections through the Predictor, on images whose resized short side comes out one pixel
short, where max_size binds, portrait and landscape, alone and batched; porting both ways in both BN layouts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssdlite_jax import porting
from ssdlite_jax.inference import Predictor
from ssdlite_jax.loading import load_detector
from ssdlite_jax.rcnn import roi_align
from ssdlite_jax.rcnn.configs import (fasterrcnn_mobilenet_v3_large_320_fpn_config,
                                      fasterrcnn_mobilenet_v3_large_fpn_config)
from ssdlite_jax.zoo import build_model
from tests.helpers import assert_same_detections, box_iou, import_or_skip
from tests.torch_reference import smooth_images, state_dict_numpy, torch_fasterrcnn_mobilenet

pytestmark = pytest.mark.torch
# (h, w): 320x426 on a 320x448 canvas; 319x422 (one short); portrait 400x320; max_size binds: 640x128.
SIZES = [(240, 320), (303, 400), (500, 400), (1000, 200)]


def _uint8(h, w, seed):
  return (smooth_images(1, h, w, seed=seed)[0] * 255).round().astype(np.uint8)


def _pair(variant, frozen_bn=True, num_classes=91):
  torch = import_or_skip("torch")
  model = torch_fasterrcnn_mobilenet(variant, frozen_bn=frozen_bn, num_classes=num_classes)
  with torch.no_grad():   # spread class scores: with random weights no softmax score passes 0.05
    model.roi_heads.box_predictor.cls_score.bias.normal_(0.0, 3.0, generator=torch.Generator().manual_seed(5))
  config = (fasterrcnn_mobilenet_v3_large_320_fpn_config if variant == "320" else
            fasterrcnn_mobilenet_v3_large_fpn_config)()
  config.frozen_bn, config.num_classes = frozen_bn, num_classes
  detector = build_model(config)
  return model, detector, porting.torch_to_flax(state_dict_numpy(model), detector)


@pytest.fixture(scope="module")
def low_res():
  return _pair("320")


def _torch_inputs(images):
  torch = import_or_skip("torch")
  return [torch.from_numpy(im.transpose(2, 0, 1).astype(np.float32) / 255.0) for im in images]


@pytest.mark.parametrize("batch", [[0], [1], [0, 2], [3]])
def test_transform_and_proposals_match_torchvision(low_res, batch):
  """The normalised padded batch (within 1e-5) and image_sizes (exact) of GeneralizedRCNNTransform; then the RPN's
  proposals per image: the same count and the same boxes in the same order (within 1e-3 px)."""
  torch = import_or_skip("torch")
  model, detector, variables = low_res
  images = [_uint8(*SIZES[i], seed=i) for i in batch]
  sizes = [im.shape[:2] for im in images]
  canvas = np.zeros((len(images), max(h for h, _ in sizes), max(w for _, w in sizes), 3), np.uint8)
  for i, im in enumerate(images):
    canvas[i, :im.shape[0], :im.shape[1]] = im
  plan = detector.prepare(sizes)
  inputs = jax.jit(detector.transform)(canvas, plan)
  _, props = jax.jit(detector.propose)(variables, inputs)
  with torch.no_grad():
    image_list, _ = model.transform(_torch_inputs(images))
    boxes, _ = model.rpn(image_list, model.backbone(image_list.tensors))
  want = image_list.tensors.numpy().transpose(0, 2, 3, 1)
  assert inputs["images"].shape == want.shape
  np.testing.assert_allclose(inputs["images"], want, rtol=0, atol=1e-5)
  assert [tuple(s) for s in np.asarray(inputs["image_sizes"])] == [tuple(s) for s in image_list.image_sizes]
  for i, want_boxes in enumerate(boxes):
    n = int(np.asarray(props["valid"][i]).sum())
    assert n == len(want_boxes) > 0
    np.testing.assert_allclose(np.asarray(props["boxes"][i, :n]), want_boxes.numpy(), rtol=0, atol=1e-3)
    assert not np.asarray(props["boxes"][i, n:]).any()


def _assert_same(got, want, near_ties=0):
  """The same detections one to one (labels, scores within 1e-5, boxes within 1e-3 px), except at most `near_ties`
  of ours whose NMS decision flipped: two overlapping candidates of one class whose scores differ by float32 noise
  (the box head's 12,544-long dot products round differently, ~3e-7) keep the other one, so ours then has the
  label and, within 1e-5, the score of one of torchvision's, with IoU >= 0.9 between the boxes: that one stands in
  for it in the one-to-one match."""
  want = {k: v.numpy() for k, v in want.items()}
  boxes = np.array(got["boxes"])
  flipped = 0
  for i, (box, label, score) in enumerate(zip(got["boxes"], got["labels"], got["scores"])):
    same = [j for j in range(len(want["scores"])) if want["labels"][j] == label
            and abs(want["scores"][j] - score) <= 1e-5]
    if any(np.abs(want["boxes"][j] - box).max() <= 1e-3 for j in same):
      continue
    twins = [j for j in same if box_iou(want["boxes"][j], box) >= 0.9]
    assert twins, (box, label, score)
    boxes[i] = want["boxes"][twins[0]]
    flipped += 1
  assert flipped <= near_ties, flipped
  assert_same_detections((boxes, got["labels"], got["scores"]), (want["boxes"], want["labels"], want["scores"]),
                         score_atol=1e-5, box_atol=1e-3)


def test_detections_match_torchvision_one_by_one_and_batched(low_res):
  """Predictor detections (labels, scores within 1e-5, boxes within 1e-3 px of the original image) equal
  model.eval()(images) for each image alone and for two of different sizes in one batch (torchvision's canvas
  is the batch's: the same images give other features there, and so other detections)."""
  torch = import_or_skip("torch")
  model, detector, variables = low_res
  images = [_uint8(*size, seed=i) for i, size in enumerate(SIZES)]
  one, two = Predictor(detector, variables, batch_size=1), Predictor(detector, variables, batch_size=2)
  with torch.no_grad():
    alone = [model(_torch_inputs([im]))[0] for im in images]
    batched = model(_torch_inputs(images[:2]))
  for got, want in zip(one(images), alone):
    _assert_same(got, want)
  counts = [len(w["scores"]) for w in alone]
  assert min(counts) > 0 and max(counts) == 100, counts   # below and at detections_per_img
  for got, want in zip(two(images[:2]), batched):
    _assert_same(got, want)


def test_high_res_proposals_and_detections_match_torchvision():
  """fasterrcnn_mobilenet_v3_large_fpn (800 / 1333, 1000 proposals): one 480x640 image -> 800x1066 on an 800x1088
  canvas (the pool level's stride is 61). The RoI features MultiScaleRoIAlign pools for its proposals, and the box
  head's logits and deltas on them, within 2e-5 of their largest value. The proposals are torchvision's set (its
  high-res NMS path sorts unstably: here two of them tie in float32 probability and come out in the other order);
  given torchvision's proposals in its order, our RoI stage gives its 100 detections, one of them the near-
  identical twin (IoU >= 0.9, score within 1e-5) of torchvision's, the two candidates' scores 1.5e-7 apart and in
  the other order here."""
  torch = import_or_skip("torch")
  model, detector, variables = _pair("hr")
  image = _uint8(480, 640, seed=7)
  with torch.no_grad():
    image_list, _ = model.transform(_torch_inputs([image]))
    feats = model.backbone(image_list.tensors)
    want_props, _ = model.rpn(image_list, feats)
    want = model.transform.postprocess(model.roi_heads(feats, want_props, image_list.image_sizes)[0],
                                       image_list.image_sizes, [image.shape[:2]])[0]
  inputs = jax.jit(detector.transform)(image[None], detector.prepare([image.shape[:2]]))
  assert tuple(np.asarray(inputs["image_sizes"])[0]) == (800, 1066) and inputs["images"].shape[1:3] == (800, 1088)
  pyramid, props = jax.jit(detector.propose)(variables, inputs)
  n = int(np.asarray(props["valid"]).sum())
  theirs = want_props[0].numpy()
  assert n == len(theirs) == 1000
  ours = np.asarray(props["boxes"][0])
  assert np.abs(ours[:, None] - theirs[None]).max(-1).min(0).max() < 1e-3      # every torch proposal is ours
  with torch.no_grad():   # the RoI features MultiScaleRoIAlign pools for these proposals, and the box head's outputs
    rois = model.roi_heads.box_roi_pool(feats, want_props, image_list.image_sizes)
    want_logits, want_deltas = model.roi_heads.box_predictor(model.roi_heads.box_head(rois))
  scale = 2.0 ** round(math.log2(pyramid[0].shape[1] / inputs["images"].shape[1]))
  got_rois = roi_align.roi_align(pyramid[0], jnp.asarray(theirs), jnp.zeros(n, jnp.int32), scale)
  logits, deltas = jax.jit(lambda v, x: detector.module.apply(v, x, method="box"))(variables, got_rois)
  for got_x, want_x in ((got_rois, rois.numpy().transpose(0, 2, 3, 1)), (logits, want_logits.numpy()),
                        (deltas, want_deltas.numpy().reshape(n, -1, 4))):
    np.testing.assert_allclose(got_x, want_x, rtol=0, atol=2e-5 * np.abs(want_x).max())
  torch_order = {"boxes": jnp.asarray(theirs)[None], "valid": jnp.ones((1, n), bool)}
  got = jax.device_get(jax.jit(detector.roi_detections)(variables, pyramid, torch_order, inputs,
                                                        np.array([image.shape[:2]], np.int32)))
  k = int(got["valid"][0].sum())
  _assert_same({"boxes": got["boxes"][0, :k], "labels": got["labels"][0, :k], "scores": got["scores"][0, :k]}, want,
               near_ties=1)


@pytest.mark.parametrize("frozen_bn,num_keys", [(True, 284), (False, 330)])
def test_porting_both_ways_in_both_layouts(tmp_path, frozen_bn, num_keys):
  """A torchvision state_dict in the released FrozenBatchNorm2d layout (284 keys) or weights=None's BatchNorm2d one
  (330) loads from .pth and .safetensors with variant, layout and class count read from the keys (13 classes
  here), and goes back with load_state_dict(strict=True), every tensor equal."""
  torch = import_or_skip("torch")
  model, detector, variables = _pair("320", frozen_bn=frozen_bn, num_classes=13)
  state = state_dict_numpy(model)
  assert len(state) == num_keys
  for suffix in (".pth", ".safetensors"):
    path = str(tmp_path / f"w{suffix}")
    porting.save_state_dict(state, path)
    loaded, got, _ = load_detector(path)
    assert loaded.config.family == "rcnn" and loaded.config.frozen_bn == frozen_bn
    assert loaded.config.num_classes == 13
    back = porting.flax_to_torch(got, loaded)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    assert list(back) == list(state)
    for k in state:
      np.testing.assert_array_equal(back[k], state[k], err_msg=k)


def test_stablehlo_export_equals_the_predictor(low_res, tmp_path):
  """export.py --format stablehlo --input-size 303x400 (resized to 319x422: one pixel short) writes a file whose
  uint8-in function gives the Predictor's detections for a batch of two; the formats without RoIAlign refuse
  with one line naming the format."""
  from ssdlite_jax.cli import export as export_cli
  _, detector, variables = low_res
  weights = str(tmp_path / "frcnn.safetensors")
  porting.save_state_dict(porting.flax_to_torch(variables, detector), weights)
  out = str(tmp_path / "frcnn.jaxexport")
  export_cli.main(["--torch-weights", weights, "--format", "stablehlo", "--input-size", "303x400", "--out", out])
  images = [_uint8(303, 400, seed=1), _uint8(303, 400, seed=8)]
  with open(out, "rb") as f:
    got = jax.device_get(jax.export.deserialize(bytearray(f.read())).call(np.stack(images)))
  for i, want in enumerate(Predictor(detector, variables)(images)):
    n = int(got["valid"][i].sum())
    assert n == len(want["scores"]) > 0
    assert_same_detections((got["boxes"][i, :n], got["labels"][i, :n], got["scores"][i, :n]),
                           (want["boxes"], want["labels"], want["scores"]), score_atol=1e-5, box_atol=1e-3)
  with pytest.raises(SystemExit, match="--format tflite: the 'rcnn' family exports to stablehlo only"):
    export_cli.main(["--torch-weights", weights, "--format", "tflite", "--out", str(tmp_path / "x.tflite")])


def test_predict_and_port_weights_programs(low_res, tmp_path):
  """predict.py on the .safetensors and on the checkpoint port_weights.py to-flax writes of it: the same JSON, the
  Predictor's detections; port_weights.py to-torch gives a file torchvision's weights=None builder loads strictly,
  every tensor as the original."""
  torch = import_or_skip("torch")
  import json
  import PIL.Image
  import torchvision
  from ssdlite_jax.cli import port_weights, predict
  _, detector, variables = low_res
  weights, ckpt, back = str(tmp_path / "w.safetensors"), str(tmp_path / "ckpt"), str(tmp_path / "back.pth")
  state = porting.flax_to_torch(variables, detector)
  porting.save_state_dict(state, weights)
  image = _uint8(303, 400, seed=1)
  PIL.Image.fromarray(image).save(tmp_path / "a.png")
  port_weights.main(["to-flax", "--torch", weights, "--out", ckpt])
  outputs = []
  for source in (["--torch-weights", weights], ["--checkpoint", ckpt]):
    out = str(tmp_path / f"dets{len(outputs)}.json")
    predict.main([*source, "--output", out, "--conf", "0", str(tmp_path / "a.png")])
    with open(out) as f:
      outputs.append(json.load(f))
  assert outputs[0] == outputs[1]
  want = Predictor(detector, variables)([image])[0]
  got = outputs[0][0]
  np.testing.assert_array_equal(got["labels"], want["labels"])
  np.testing.assert_allclose(got["scores"], want["scores"], rtol=0, atol=1e-6)
  np.testing.assert_allclose(got["boxes"], want["boxes"], rtol=0, atol=1e-4)
  port_weights.main(["to-torch", "--checkpoint", ckpt, "--out", back])
  model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None)
  loaded = torch.load(back, weights_only=True)
  model.load_state_dict(loaded, strict=True)
  assert list(loaded) == list(state)
  for k, v in state.items():
    np.testing.assert_array_equal(loaded[k].numpy(), v, err_msg=k)
