"""Faster R-CNN MobileNetV3-Large FPN's parts against live torchvision 0.29.1 (tests/torch_reference.py: random
weights, random BN statistics; the released FrozenBatchNorm layout and the weights=None BatchNorm one): parameter
and key counts, the pyramid and the RPN head on padded batches, the anchors on the canvases whose pool stride is
not 64, RoIAlign on the edge cases its kernel special-cases, the box head and predictor."""

import jax
import jax.numpy as jnp
import math
import numpy as np
import pytest
import flax

from ssdlite_jax import porting
from ssdlite_jax.models import faster_rcnn
from ssdlite_jax.rcnn import anchors, roi_align
from ssdlite_jax.rcnn.configs import fasterrcnn_mobilenet_v3_large_320_fpn_config
from tests.helpers import import_or_skip
from tests.torch_reference import smooth_images, state_dict_numpy, to_nchw, torch_fasterrcnn_mobilenet

pytestmark = pytest.mark.torch
CFG = fasterrcnn_mobilenet_v3_large_320_fpn_config()


@pytest.fixture(scope="module", params=["frozen_bn", "bn"])
def pair(request):
  """(torch model, our networks, our variables ported from it) for one BN layout."""
  frozen = request.param == "frozen_bn"
  model = torch_fasterrcnn_mobilenet("320", frozen_bn=frozen)
  net = faster_rcnn.build_networks(91, frozen, "cpu", jnp.float32)
  want = porting.shapes(jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  flat, problems = porting.read(state_dict_numpy(model), porting.expand(net.torchvision_modules()), want)
  assert not problems and set(flat) == set(want)
  return model, net, flax.traverse_util.unflatten_dict(flat)


def test_parameter_and_key_counts_are_torchvisions(pair):
  """19,386,354 parameters with FrozenBatchNorm2d (its tensors are buffers: the weight enums' num_params), 19,410,754
  with BatchNorm2d; the state_dict keys (284 / 330) in torchvision's order."""
  model, net, variables = pair
  frozen = net.norm == "frozen_bn"
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(variables["params"])) == (19_386_354 if frozen else 19_410_754)
  keys = [key for _, _, key, _ in porting.expand(net.torchvision_modules())]
  assert keys == list(model.state_dict()) and len(keys) == (284 if frozen else 330)


@pytest.mark.parametrize("canvas,batch", [((320, 320), 1), ((416, 448), 2)])
def test_pyramid_and_rpn_head_match_torchvision(pair, canvas, batch):
  """The normalised padded batch -> FPN '0', '1', 'pool' and the RPN logits and deltas in torchvision's flattened
  order (concat_box_prediction_layers), each within 2e-5 of its largest value."""
  torch = import_or_skip("torch")
  from torchvision.models.detection.rpn import concat_box_prediction_layers
  model, net, variables = pair
  x = (smooth_images(batch, *canvas, seed=3) - np.float32(CFG.image_mean)) / np.float32(CFG.image_std)
  pyramid, (logits, deltas) = jax.jit(lambda v, x: (
      net.apply(v, x, method="features"), net.apply(v, net.apply(v, x, method="features"), method="rpn")))(
          variables, x)
  with torch.no_grad():
    feats = model.backbone(to_nchw(x))
    obj, reg = concat_box_prediction_layers(*model.rpn.head(list(feats.values())))
  for got, (name, want) in zip(pyramid, feats.items()):
    want = want.numpy().transpose(0, 2, 3, 1)
    assert got.shape == want.shape, name
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max(), err_msg=name)
  for got, want in ((logits, obj.numpy().reshape(batch, -1)), (deltas, reg.numpy().reshape(batch, -1, 4))):
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("canvas", [(320, 320), (320, 448), (416, 448), (800, 800), (800, 1088), (672, 1344)])
def test_anchors_match_torchvision(canvas):
  """AnchorGenerator(((32..512),) * 3, ((0.5, 1, 2),) * 3) on the three levels of a padded canvas, bit-exact: 15
  per location, centres at x * stride with no offset, the pool level's stride H // grid (59 at 416, 61 at 800)."""
  torch = import_or_skip("torch")
  from torchvision.models.detection.anchor_utils import AnchorGenerator
  from torchvision.models.detection.image_list import ImageList
  h, w = canvas
  grids = [(h // 32, w // 32)] * 2 + [(-(-h // 64), -(-w // 64))]
  ours = anchors.grid_anchors(grids, canvas, CFG.anchor_sizes, CFG.aspect_ratios)
  gen = AnchorGenerator((tuple(CFG.anchor_sizes),) * 3, (tuple(CFG.aspect_ratios),) * 3)
  images = ImageList(torch.zeros(1, 3, h, w), [(h, w)])
  want = gen(images, [torch.zeros(1, 1, gh, gw) for gh, gw in grids])[0].numpy()
  assert ours.dtype == np.float32 and ours.shape == want.shape == (15 * sum(a * b for a, b in grids), 4)
  np.testing.assert_array_equal(ours, want)


def test_roi_align_matches_torchvision_on_edge_cases():
  """roi_align(aligned=False, sampling_ratio=2, 7x7, scale 1/32) on a 320x448 batch of 2: RoIs inside, crossing
  every border, beyond the -1 / H, W sample limits (those samples are 0), tiny boxes at the bottom-right corner
  (the max(size, 1) clamp pushes samples past W), zero-size and inverted boxes, 500 random ones; within 1e-5."""
  torch = import_or_skip("torch")
  from torchvision.ops import roi_align as torch_roi_align
  rs = np.random.RandomState(0)
  fmap = rs.randn(2, 16, 10, 14).astype(np.float32)   # NCHW: 16 channels on the 10 x 14 grid of 320 x 448
  h, w = 320, 448
  edge = np.array([[0, 0, 448, 320], [10, 20, 200, 150], [-100, -80, 60, 40], [400, 280, 600, 500],
                   [w - 0.001, h - 0.001, w, h], [w - 5, h - 5, w, h], [0, 0, 0.001, 0.001], [50, 50, 50, 50],
                   [300, 200, 100, 50], [-60, -60, -33, -33], [-31, -31, -20, -20], [w + 1, h + 1, w + 90, h + 90],
                   [447.9, 0, 448, 319.9], [0, 319.5, 448, 320]], np.float32)
  corners = rs.uniform(-100, 560, (500, 2, 2)).astype(np.float32)
  rand = np.concatenate([corners.min(1), corners.max(1)], axis=1)
  rois = np.concatenate([edge, rand])
  batch_index = np.concatenate([np.arange(len(edge)) % 2, rs.randint(0, 2, len(rand))]).astype(np.int32)
  got = jax.jit(roi_align.roi_align, static_argnums=(3,))(fmap.transpose(0, 2, 3, 1), rois, batch_index, 1 / 32)
  want = torch_roi_align(torch.from_numpy(fmap), torch.from_numpy(np.concatenate(
      [batch_index[:, None].astype(np.float32), rois], axis=1)), (7, 7), 1 / 32, 2, aligned=False).numpy()
  assert got.shape == (len(rois), 7, 7, 16)
  np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), rtol=0, atol=1e-5)
  assert np.all(want[4] == 0) and np.abs(want[11]).max() == 0   # the corner case and a box beyond the limits


def test_box_head_and_predictor_match_torchvision(pair):
  """RoI features [R, 7, 7, 256] -> TwoMLPHead (fc6 reads torch's NCHW flatten: its kernel permuted on porting)
  -> FastRCNNPredictor: class logits and per-class deltas within 2e-5 of their largest value."""
  torch = import_or_skip("torch")
  model, net, variables = pair
  feats = np.random.RandomState(1).randn(37, 7, 7, 256).astype(np.float32)
  logits, deltas = jax.jit(lambda v, x: net.apply(v, x, method="box"))(variables, feats)
  with torch.no_grad():
    want_logits, want_deltas = model.roi_heads.box_predictor(model.roi_heads.box_head(to_nchw(feats)))
  np.testing.assert_allclose(logits, want_logits.numpy(), rtol=0, atol=2e-5 * np.abs(want_logits.numpy()).max())
  np.testing.assert_allclose(deltas, want_deltas.numpy().reshape(37, 91, 4), rtol=0,
                             atol=2e-5 * np.abs(want_deltas.numpy()).max())


@pytest.mark.parametrize("size", [(10, 14), (13, 17), (4, 9), (25, 34)])
def test_fpn_top_down_resize_is_torchs_nearest(size):
  """The FPN's top-down path (an identity for these models' two stride-32 taps) as F.interpolate(mode='nearest')
  from a 5 x 7 map: up, down and odd ratios, exact."""
  torch = import_or_skip("torch")
  from ssdlite_jax.models.fpn import nearest_resize
  x = np.random.RandomState(2).randn(1, 5, 7, 3).astype(np.float32)
  want = torch.nn.functional.interpolate(to_nchw(x), size=size, mode="nearest").numpy().transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(nearest_resize(x, size), want)
