"""The SSD family against live torchvision 0.29.1: SSD300-VGG16 = ssd300_vgg16(weights=None, weights_backbone=None);
SSD512-VGG16 = the same parts at 512 (torchvision has no builder); SSD512-ResNet50 = PR #3760's network rebuilt
from torchvision's parts (tests/torch_reference.py). Layout, anchors, forward and porting for all three; for SSD300
also one SGD step through our train step (a model without batch_stats), end-to-end detections and the ImageNet
backbone import; for SSD512-ResNet50 a falling loss over a few steps."""

import jax
import numpy as np
import pytest

from ssdlite_jax import optim, porting
from ssdlite_jax.distributed import make_mesh, shard_batch
from ssdlite_jax.inference import Predictor
from ssdlite_jax.loading import load_detector
from ssdlite_jax.zoo import build_model
from ssdlite_jax.ssd.configs import ssd300_vgg16_config, ssd512_resnet50_config, ssd512_vgg16_config
from ssdlite_jax.train_step import create_train_state, make_train_step
from tests.helpers import import_or_skip
from tests.test_model_parity import assert_same_detections
from tests.torch_reference import smooth_images, state_dict_numpy, to_nchw, torch_ssd512_resnet50

pytestmark = pytest.mark.torch

# Up to 3 GT boxes per image (xyxy px of the 300 input); [0, 0, 0, 0] rows are padding.
BOXES = np.array([[[12, 20, 140, 200], [150, 60, 290, 250], [40, 230, 120, 295]],
                  [[100, 90, 220, 180], [5, 5, 290, 295], [0, 0, 0, 0]]], np.float32)
LABELS = np.array([[1, 18, 62], [3, 44, 0]], np.int32)
MASK = LABELS > 0


def _torch_ssd300(seed=0):
  torch = import_or_skip("torch")
  torchvision = import_or_skip("torchvision")
  torch.manual_seed(seed)
  return torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None).eval()


def _torch_ssd512(seed=0):
  """torchvision's SSD512-VGG16 parts: the highres extractor, SSDHead over 7 maps, the builder's anchors."""
  torch = import_or_skip("torch")
  torchvision = import_or_skip("torchvision")
  from torchvision.models.detection import anchor_utils, ssd
  torch.manual_seed(seed)
  a = ssd512_vgg16_config().anchors
  anchors = anchor_utils.DefaultBoxGenerator([list(r) for r in a.aspect_ratios], scales=list(a.scales))
  backbone = ssd._vgg_extractor(torchvision.models.vgg16(weights=None), True, 5)
  return ssd.SSD(backbone, anchors, (512, 512), 91, image_mean=[0.48235, 0.45882, 0.40784],
                 image_std=[1.0 / 255.0] * 3).eval()


# name: (our model config, torchvision reference, parameters, state_dict keys, feature maps [H, W, C])
VARIANTS = {
    "ssd300_vgg16": (ssd300_vgg16_config, _torch_ssd300, 35_641_826, 71,
                     [(38, 38, 512), (19, 19, 1024), (10, 10, 512), (5, 5, 256), (3, 3, 256), (1, 1, 256)]),
    "ssd512_vgg16": (ssd512_vgg16_config, _torch_ssd512, 37_075_166, 79,
                     [(64, 64, 512), (32, 32, 1024), (16, 16, 512), (8, 8, 256), (6, 6, 256), (4, 4, 256),
                      (1, 1, 256)]),
    "ssd512_resnet50": (ssd512_resnet50_config, torch_ssd512_resnet50, 42_704_482, 402,
                        [(32, 32, 2048), (16, 16, 512), (8, 8, 512), (4, 4, 256), (2, 2, 256), (1, 1, 256)]),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
  """(name, torchvision model, our detector, its ported variables) per variant."""
  make_config, make_torch, *_ = VARIANTS[request.param]
  model = make_torch()
  det = build_model(make_config())
  return request.param, model, det, porting.torch_to_flax(state_dict_numpy(model), det)


@pytest.fixture(scope="module")
def torch_model():
  return _torch_ssd300()


@pytest.fixture(scope="module")
def ported(torch_model):
  det = build_model(ssd300_vgg16_config())
  return det, porting.torch_to_flax(state_dict_numpy(torch_model), det)


def test_parameters_anchors_and_state_dict_layout(variant):
  torch = import_or_skip("torch")
  from torchvision.models.detection.image_list import ImageList
  name, model, det, _ = variant
  _, _, num_params, num_keys, maps = VARIANTS[name]
  variables = jax.eval_shape(det.init, jax.random.key(0))
  assert (variables["batch_stats"] == {}) == (det.config.backbone == "vgg16")   # VGG has no BatchNorm
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"])) == num_params
  assert sum(p.numel() for p in model.parameters()) == num_params
  ref = model.state_dict()
  assert [key for _, _, key, _ in porting.key_map(det)] == list(ref) and len(ref) == num_keys
  size = det.config.image_size
  feats = [torch.zeros(1, c, h, w) for h, w, c in maps]
  want = model.anchor_generator(ImageList(torch.zeros(1, 3, size, size), [(size, size)]), feats)[0].numpy()
  np.testing.assert_array_equal(det.anchors, want)   # bit-exact
  assert len(want) == {"ssd300_vgg16": 8732, "ssd512_vgg16": 24660, "ssd512_resnet50": 6132}[name]


def test_feature_maps_and_heads(variant):
  torch = import_or_skip("torch")
  name, model, det, variables = variant
  size = det.config.image_size
  x = smooth_images(1, size, size, seed=1)
  t = model.transform
  with torch.no_grad():
    xn = (to_nchw(x) - torch.tensor(t.image_mean)[:, None, None]) / torch.tensor(t.image_std)[:, None, None]
    feats = [f.permute(0, 2, 3, 1).numpy() for f in model.backbone(xn).values()]
    head = {k: v.numpy() for k, v in model.head(list(model.backbone(xn).values())).items()}
  ours, out = jax.jit(lambda v, x: (det.module.apply(v, x, method=det.module.feature_maps),
                                    det.module.apply(v, x)))(variables, x)
  assert [f.shape[1:] for f in ours] == VARIANTS[name][4]
  # Inputs are 0-255 minus the mean, so compare relative to each map's largest value (measured 4.5e-6 at most).
  for i, (a, b) in enumerate(zip(ours, feats)):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * np.abs(b).max(), err_msg=f"feature map {i}")
  for k in ("cls_logits", "bbox_regression"):
    np.testing.assert_allclose(out[k], head[k], rtol=0, atol=2e-5 * np.abs(head[k]).max(), err_msg=k)


def test_sgd_step_matches_torchvision():
  """references/detection's SGD step (momentum 0.9, coupled weight decay 5e-4 on every parameter) from the same
  weights, float32 on both sides. Measured: losses within 3e-7; each tensor's update within 7e-4 of torch's
  (conv1_1, deepest in the backward), median 1.8e-5."""
  torch = import_or_skip("torch")
  model = _torch_ssd300(seed=1).train()
  start = {k: v.copy() for k, v in state_dict_numpy(model).items()}
  images = smooth_images(2, 300, 300, seed=3)
  opt = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)
  targets = [dict(boxes=torch.from_numpy(b[m]), labels=torch.from_numpy(c[m].astype(np.int64)))
             for b, c, m in zip(BOXES, LABELS, MASK)]
  losses = model(list(to_nchw(images)), targets)
  opt.zero_grad()
  sum(losses.values()).backward()
  opt.step()
  want = state_dict_numpy(model)

  det = build_model(ssd300_vgg16_config())
  config = optim.default_optim_config()
  config.update(learning_rate=0.002, base_batch_size=2, batch_size=2, weight_decay=5e-4, warmup_iters=0,
                schedule="multistep", milestones=(80, 110))
  tx, schedule = optim.make_optimizer(config, steps_per_epoch=100)
  mesh = make_mesh(jax.devices()[:1])
  state = create_train_state(det, tx, jax.random.key(0), mesh, porting.torch_to_flax(start, det))
  batch = dict(image=images, boxes=BOXES, labels=LABELS, mask=MASK)
  state, metrics = make_train_step(det, tx, schedule, mesh)(state, shard_batch(batch, mesh))
  assert bool(metrics["finite"]) and int(state.step) == 1 and state.batch_stats == {}
  for k in ("bbox_regression", "classification"):
    np.testing.assert_allclose(metrics[k], float(losses[k].detach()), rtol=1e-5, err_msg=k)
  ours = porting.flax_to_torch(jax.device_get(state.variables), det)
  err = {}
  for k in want:
    update = np.linalg.norm(want[k] - start[k])
    if update == 0:   # e.g. a head level with no positive and no mined negative: no gradient, zero weights
      np.testing.assert_array_equal(ours[k], start[k], err_msg=k)
    else:
      err[k] = np.linalg.norm(ours[k] - want[k]) / update
  worst = max(err, key=err.get)
  assert len(err) > 60 and np.median(list(err.values())) <= 1e-4 and err[worst] <= 1e-2, (worst, err[worst])


def test_end_to_end_detections(ported, torch_model):
  torch = import_or_skip("torch")
  det, variables = ported
  images = [(smooth_images(1, h, w, seed=h)[0] * 255).round().astype(np.uint8)
            for h, w in [(480, 640), (300, 300), (97, 211)]]
  ours = Predictor(det, variables, batch_size=4)(images)
  with torch.no_grad():
    ref = torch_model([to_nchw(im[None].astype(np.float32) / 255.0)[0] for im in images])
  # torchvision normalises then resizes, we resize then normalise: on SSD300's 0-255 input scale that moves the
  # network input by up to 3.8e-5 and a box by up to 1.6e-3 px (measured, 640 px image): 1e-5 of the image side.
  for o, r, im in zip(ours, ref, images):
    assert len(r["scores"]) > 10
    assert_same_detections(o, r, box_atol=1e-5 * max(im.shape))


def test_porting_round_trip_and_variant_from_the_keys(variant, tmp_path):
  torch = import_or_skip("torch")
  name, model, det, variables = variant
  fresh = VARIANTS[name][1](seed=7)
  back = porting.flax_to_torch(variables, det)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  for k, v in model.state_dict().items():
    assert torch.equal(fresh.state_dict()[k], v), k
  for fmt in ("pth", "safetensors"):
    porting.save_state_dict(back, str(tmp_path / f"{name}.{fmt}"))
    loaded, got, step = load_detector(str(tmp_path / f"{name}.{fmt}"))
    assert step is None and loaded.config.to_dict() == VARIANTS[name][0]().to_dict()
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(variables)):
      np.testing.assert_array_equal(a, b)


def test_imagenet_backbone_import(ported, tmp_path):
  """A file in the layout of vgg16_features-amdegroot-88682ab5.pth (torchvision's VGG: features.* real, the
  classifier NaN): the 13 convs land in the backbone; everything else keeps its value."""
  torch = import_or_skip("torch")
  torchvision = import_or_skip("torchvision")
  det, variables = ported
  torch.manual_seed(3)
  vgg = torchvision.models.vgg16(weights=None)
  with torch.no_grad():
    for p in vgg.classifier.parameters():
      p.fill_(float("nan"))
  torch.save(vgg.state_dict(), tmp_path / "vgg16_features.pth")
  got, count = porting.import_backbone(porting.load_state_dict(str(tmp_path / "vgg16_features.pth")), det,
                                       variables)
  assert count == 26
  ours, before, ref = porting.flax_to_torch(got, det), porting.flax_to_torch(variables, det), vgg.state_dict()
  for k in ours:
    parts = k.split(".")
    src = None
    if parts[1] == "features":                                        # conv1_1..conv4_3
      src = f"features.{parts[2]}.{parts[-1]}"
    elif parts[1:3] == ["extra", "0"] and parts[3] in ("1", "3", "5"):  # conv5_x after pool4
      src = f"features.{int(parts[3]) + 23}.{parts[-1]}"
    np.testing.assert_array_equal(ours[k], ref[src].numpy() if src else before[k], err_msg=k)
  with pytest.raises(ValueError, match=r"missing key features\.28\.bias"):
    porting.import_backbone({k: v.numpy() for k, v in ref.items() if k != "features.28.bias"}, det, variables)


def test_ssd512_resnet50_loss_falls():
  """Three SGD steps on one image (train-mode BN) from torchvision's init: the loss falls and the BN running
  statistics move. At 448 px (maps 28..1, the smallest input all five extra blocks take) to save CI time."""
  model_config = ssd512_resnet50_config()
  model_config.image_size = 448
  det = build_model(model_config)
  config = optim.default_optim_config()
  config.update(learning_rate=0.01, base_batch_size=1, batch_size=1, weight_decay=5e-4, warmup_iters=0)
  tx, schedule = optim.make_optimizer(config, steps_per_epoch=100)
  mesh = make_mesh(jax.devices()[:1])
  state = create_train_state(det, tx, jax.random.key(0), mesh)
  before = jax.device_get(state.batch_stats)
  batch = shard_batch(dict(image=smooth_images(1, 448, 448, seed=4), boxes=BOXES[:1] * (448 / 300),
                           labels=LABELS[:1], mask=MASK[:1]), mesh)
  step = make_train_step(det, tx, schedule, mesh)
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all() and losses[2] < losses[1] < losses[0], losses
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, jax.device_get(state.batch_stats))
  assert all(jax.tree.leaves(moved))


def test_resnet50_imagenet_backbone_import():
  """torchvision's resnet50() state_dict (the layout of resnet50-0676ba61.pth): the trunk, BN statistics included,
  lands in backbone.features (conv1 -> .0, bn1 -> .1, layer{s} -> .{3 + s}); fc, extras and heads are untouched."""
  torch = import_or_skip("torch")
  torchvision = import_or_skip("torchvision")
  det = build_model(ssd512_resnet50_config())
  variables = det.init(jax.random.key(0))
  torch.manual_seed(4)
  resnet = torchvision.models.resnet50(weights=None)
  with torch.no_grad():
    for m in resnet.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-1, 1)
        m.num_batches_tracked.fill_(7)
  ref = state_dict_numpy(resnet)
  got, count = porting.import_backbone(ref, det, variables)
  assert count == len(ref) - 2 == 318   # all but fc.weight, fc.bias
  ours, before = porting.flax_to_torch(got, det), porting.flax_to_torch(variables, det)
  def source(key):   # our torch key -> the resnet50 key it comes from, or None
    parts = key.split(".")
    if parts[1] != "features":
      return None
    index, rest = int(parts[2]), ".".join(parts[3:])
    return {0: "conv1", 1: "bn1"}.get(index, f"layer{index - 3}") + "." + rest
  for k in ours:
    want = ref[source(k)] if source(k) else before[k]
    np.testing.assert_array_equal(ours[k], want, err_msg=k)


def test_ssd300_from_scratch_init_matches_torchvision(torch_model):
  """Our fresh init draws each tensor as torchvision's: per tensor the same spread (kaiming-normal fan_out for the
  13 VGG convs, xavier-uniform with its bound for fc6/fc7, extras and heads), zero biases, scale_weight 20."""
  det = build_model(ssd300_vgg16_config())
  ours = porting.flax_to_torch(det.init(jax.random.key(0)), det)
  ref = state_dict_numpy(torch_model)
  for k, want in ref.items():
    got = ours[k]
    if want.ndim == 1:
      np.testing.assert_array_equal(got, want, err_msg=k)   # biases 0, scale_weight 20: deterministic
      continue
    assert abs(got.std() / want.std() - 1) < 0.05, (k, got.std(), want.std())
    assert abs(got.mean()) < 0.05 * want.std(), k
    vgg_conv = k.startswith("backbone.features.") or k.split(".")[:4] in (
        ["backbone", "extra", "0", i] for i in ("1", "3", "5"))          # conv1_1..conv5_3: kaiming normal
    if not vgg_conv:   # xavier-uniform U(-a, a): both maxima just under a
      bound = np.abs(want).max()
      assert 0.99 * bound < np.abs(got).max() <= 1.001 * bound, k
