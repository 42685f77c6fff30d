"""Forward, anchors, post-processing and end-to-end detections against live torchvision 0.29.1."""

import jax
import numpy as np
import pytest

from ssdlite_jax import porting
from ssdlite_jax.ssd import postprocess
from ssdlite_jax.inference import Predictor
from ssdlite_jax.zoo import build_model
from ssdlite_jax.ssd.configs import ssdlite320_config
from tests.helpers import import_or_skip
from tests.torch_reference import random_torchvision_ssdlite, smooth_images, state_dict_numpy, to_nchw

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def torch_model():
  return random_torchvision_ssdlite()


@pytest.fixture(scope="module", params=["cpu", "xla", "per_platform"])   # per_platform: cpu's branch here
def ported(request, torch_model):
  cfg = ssdlite320_config()
  cfg.kernels = request.param
  det = build_model(cfg)
  return det, porting.torch_to_flax(state_dict_numpy(torch_model), det)


@pytest.fixture(scope="module")
def torch_forward(torch_model):
  torch = import_or_skip("torch")
  x = smooth_images(2, 320, 320, seed=1)
  with torch.no_grad():
    xn = (to_nchw(x) - 0.5) / 0.5
    body = torch_model.backbone.features
    tap0 = body[0](xn)
    feats = list(torch_model.backbone(xn).values())
    head = torch_model.head(feats)
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  return x, nhwc(tap0), [nhwc(f) for f in feats], {k: v.numpy() for k, v in head.items()}


def test_parameter_count_matches_torchvision(torch_model):
  det = build_model(ssdlite320_config())
  variables = jax.eval_shape(det.init, jax.random.key(0))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
  assert n == sum(p.numel() for p in torch_model.parameters()) == 3_440_060


def test_feature_maps_and_heads(ported, torch_forward):
  det, variables = ported
  x, tap0, feats, head = torch_forward
  ours = jax.jit(lambda v, x: det.module.apply(v, x, method=det.module.feature_maps))(variables, x)
  assert [f.shape for f in ours] == [f.shape for f in feats]
  assert ours[0].shape == (2, 20, 20, 672) and ours[1].shape == (2, 10, 10, 480)
  np.testing.assert_allclose(ours[0], tap0, atol=1e-4)
  for a, b in zip(ours, feats):
    np.testing.assert_allclose(a, b, atol=1e-4)
  out = jax.jit(det.module.apply)(variables, x)
  np.testing.assert_allclose(out["cls_logits"], head["cls_logits"], atol=1e-4)
  np.testing.assert_allclose(out["bbox_regression"], head["bbox_regression"], atol=1e-4)


@pytest.mark.parametrize("image_size", [320, 512])
def test_anchors_match_default_box_generator(torch_model, image_size):
  torch = import_or_skip("torch")
  from torchvision.models.detection.image_list import ImageList
  cfg = ssdlite320_config()
  cfg.image_size = image_size
  det = build_model(cfg)
  with torch.no_grad():
    x = torch.zeros(1, 3, image_size, image_size)
    feats = list(torch_model.backbone(x).values())
    ref = torch_model.anchor_generator(ImageList(x, [(image_size, image_size)]), feats)[0].numpy()
  assert det.anchors.shape == ref.shape
  np.testing.assert_array_equal(det.anchors, ref)   # bit-exact: the same float32 operations in the same order
  if image_size == 320:
    assert det.anchors.shape == (3234, 4)


def test_postprocess_matches_torchvision(torch_model):
  torch = import_or_skip("torch")
  det = build_model(ssdlite320_config())
  rs = np.random.RandomState(3)
  logits = rs.normal(0, 3, (2, 3234, 91)).astype(np.float32)
  reg = rs.normal(0, 1, (2, 3234, 4)).astype(np.float32)
  sizes = [(320, 320), (480, 640)]
  out = jax.jit(postprocess.postprocess, static_argnums=(4,))(logits, reg, det.anchors, np.asarray(sizes), (320, 320))
  anchors = [torch.from_numpy(det.anchors)] * 2
  with torch.no_grad():
    ref = torch_model.postprocess_detections(
        {"cls_logits": torch.from_numpy(logits), "bbox_regression": torch.from_numpy(reg)}, anchors, [(320, 320)] * 2)
    ref = torch_model.transform.postprocess(ref, [(320, 320)] * 2, sizes)
  for i in range(2):
    assert_same_detections({k: np.asarray(v[i])[np.asarray(out["valid"][i])] for k, v in out.items()}, ref[i])


def assert_same_detections(ours, ref, top=100, box_atol=1e-3):
  """torchvision's top-`top` detections each appear in ours with the same label, score (1e-5) and box (`box_atol`
  px); ours are sorted by descending score and the counts agree."""
  r_scores, r_labels, r_boxes = (ref[k].numpy() for k in ("scores", "labels", "boxes"))
  assert len(ours["scores"]) == len(r_scores)
  assert np.all(np.diff(ours["scores"]) <= 0)
  np.testing.assert_allclose(ours["scores"][:top], r_scores[:top], atol=1e-5)
  for j in range(min(top, len(r_scores))):
    cand = np.nonzero((ours["labels"] == r_labels[j]) & (np.abs(ours["scores"] - r_scores[j]) <= 1e-5))[0]
    dist = np.abs(ours["boxes"][cand] - r_boxes[j]).max(axis=1) if len(cand) else np.array([np.inf])
    assert dist.min() <= box_atol, f"torchvision detection {j} (label {r_labels[j]}, score {r_scores[j]}) not found"


def test_end_to_end_detections(ported, torch_model):
  torch = import_or_skip("torch")
  det, variables = ported
  predictor = Predictor(det, variables, batch_size=4)
  images = [(smooth_images(1, h, w, seed=h)[0] * 255).round().astype(np.uint8)
            for h, w in [(480, 640), (333, 500), (320, 320), (97, 211)]]
  ours = predictor(images)
  with torch.no_grad():
    ref = torch_model([to_nchw(im[None].astype(np.float32) / 255.0)[0] for im in images])
  for o, r in zip(ours, ref):
    assert o["boxes"].dtype == np.float32 and o["labels"].dtype == np.int64
    assert_same_detections(o, r)
