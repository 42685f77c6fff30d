"""Faster R-CNN's training targets: the Matcher against torchvision's (both of its settings, padded ground truth,
duplicate ground truth, a ground truth no candidate overlaps, none at all), the balanced sampler's counts,
positive fraction and uniformity, the RPN and RoI losses and their gradients, one float64 SGD step of the whole
model, and the frozen backbone stages."""

import jax
import numpy as np
import pytest

from ssdlite_jax.rcnn import matcher
from tests.helpers import import_or_skip


def _case(seed, num_gt, num_candidates=300):
  rs = np.random.RandomState(seed)
  def boxes(n, spread):
    xy = rs.uniform(0, 300, (n, 2))
    wh = rs.uniform(8, spread, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
  gt = boxes(num_gt, 120)
  cand = np.concatenate([boxes(num_candidates - 2 * num_gt, 150),
                         gt + rs.uniform(-6, 6, gt.shape).astype(np.float32), gt])
  return gt, cand


@pytest.mark.torch
@pytest.mark.parametrize("high,low,low_quality", [(0.7, 0.3, True), (0.5, 0.5, False)])
@pytest.mark.parametrize("variant", ["random", "duplicate_gt", "isolated_gt", "no_gt"])
def test_match_equals_torchvision_with_padding(high, low, low_quality, variant):
  """Ours on the ground truth padded with zero boxes to 12 rows equals torchvision's Matcher on the unpadded
  ground truth (for no ground truth: torchvision's RPN and RoI heads take every candidate as background)."""
  torch = import_or_skip("torch")
  from torchvision.models.detection import _utils
  from torchvision.ops import box_iou
  gt, cand = _case(3, 5)
  if variant == "duplicate_gt":      # tied IoU rows: argmax ties go to the lower ground-truth index
    gt = np.concatenate([gt, gt[:2]])
  elif variant == "isolated_gt":     # overlaps no candidate: its best IoU is 0, shared by every candidate
    gt = np.concatenate([gt, np.array([[2000, 2000, 2010, 2010]], np.float32)])
  elif variant == "no_gt":
    gt = gt[:0]
  padded = np.zeros((12, 4), np.float32)
  padded[:len(gt)] = gt
  valid = np.arange(12) < len(gt)
  got = np.asarray(jax.jit(matcher.match, static_argnums=(3, 4, 5))(padded, valid, cand, high, low, low_quality))
  if len(gt):
    want = _utils.Matcher(high, low, low_quality)(box_iou(torch.from_numpy(gt), torch.from_numpy(cand))).numpy()
  else:
    want = np.full(len(cand), -1)
  np.testing.assert_array_equal(got, want)
  if variant == "random":   # the cases are what they say: some matched, some ignored, some background
    assert {-1, 0}.issubset(set(got.tolist())) and (got >= 0).sum() >= 5
    if high != low:
      assert (got == -2).any()


def test_padded_zero_boxes_would_match_everything_without_the_mask():
  """The trap the mask avoids: treated as real, a zero box's best IoU (0) is every candidate's IoU with it, so
  the low-quality step turns all the candidates below 0.3 into matches."""
  gt, cand = _case(4, 3)
  padded = np.concatenate([gt, np.zeros((2, 4), np.float32)])
  masked = np.asarray(matcher.match(padded, np.arange(5) < 3, cand, 0.7, 0.3, True))
  unmasked = np.asarray(matcher.match(padded, np.ones(5, bool), cand, 0.7, 0.3, True))
  assert (masked == -1).sum() > 100 and (unmasked == -1).sum() == 0


@pytest.mark.parametrize("num_pos,num_neg", [(300, 1000), (40, 1000), (40, 100), (0, 30), (0, 0)])
def test_balanced_sample_counts(num_pos, num_neg):
  """256 per image, half positive at most: min(#pos, 128) positives, min(#neg, 256 - those) negatives, only from
  their candidates (the rest of 1,400 are ignored ones)."""
  n = 1400
  positive = np.zeros(n, bool)
  negative = np.zeros(n, bool)
  idx = np.random.RandomState(0).permutation(n)
  positive[idx[:num_pos]] = True
  negative[idx[num_pos:num_pos + num_neg]] = True
  pos, neg = jax.jit(matcher.balanced_sample, static_argnums=(3, 4))(jax.random.key(0), positive, negative, 256, 0.5)
  pos, neg = np.asarray(pos), np.asarray(neg)
  want_pos = min(num_pos, 128)
  assert pos.sum() == want_pos and neg.sum() == min(num_neg, 256 - want_pos)
  assert not (pos & ~positive).any() and not (neg & ~negative).any()


def test_balanced_sample_is_uniform():
  """Over 2,000 draws, each of 40 positives (10 taken a draw) and 200 negatives (20 taken) is taken at its
  expected rate: every count within 5 standard deviations of the binomial mean, and the counts' spread that of
  a binomial (chi-square per degree of freedom within 0.6..1.5)."""
  positive = np.zeros(300, bool)
  negative = np.zeros(300, bool)
  positive[:40] = True
  negative[100:] = True
  keys = jax.random.split(jax.random.key(1), 2000)
  pos, neg = jax.jit(jax.vmap(lambda k: matcher.balanced_sample(k, positive, negative, 30, 1 / 3)))(keys)
  for counts, candidates, taken in ((np.asarray(pos).sum(0)[:40], 40, 10), (np.asarray(neg).sum(0)[100:], 200, 20)):
    p = taken / candidates
    mean, var = 2000 * p, 2000 * p * (1 - p)
    assert np.abs(counts - mean).max() < 5 * np.sqrt(var)
    assert 0.6 < ((counts - mean) ** 2 / var).mean() < 1.5


def _gt(rs, counts, size=(320, 448), max_boxes=5):
  boxes = np.zeros((len(counts), max_boxes, 4), np.float32)
  labels = np.zeros((len(counts), max_boxes), np.int32)
  for i, n in enumerate(counts):
    xy = rs.uniform(0, [size[1] - 60, size[0] - 60], (n, 2))
    boxes[i, :n] = np.concatenate([xy, xy + rs.uniform(12, 160, (n, 2))], axis=1)
    labels[i, :n] = rs.randint(1, 91, n)
  return boxes, labels, np.arange(max_boxes)[None] < np.asarray(counts)[:, None]


@pytest.mark.torch
def test_rpn_targets_loss_and_gradients_equal_torchvisions():
  """On a 320x448 canvas's 4,725 anchors, two images with 3 and 1 ground-truth boxes (padded to 5): the labels and
  the positives' regression targets of assign_targets_to_anchors + encode; with our sampled masks handed to its
  fg_bg_sampler, compute_loss's two losses (1e-6) and their gradients in the logits and deltas (1e-6 of the
  largest)."""
  torch = import_or_skip("torch")
  from ssdlite_jax.rcnn import anchors as anchors_lib, losses
  from tests.torch_reference import torch_fasterrcnn_mobilenet
  rpn = torch_fasterrcnn_mobilenet("320").rpn
  anchors = anchors_lib.grid_anchors([(10, 14), (10, 14), (5, 7)], (320, 448), (32, 64, 128, 256, 512),
                                     (0.5, 1.0, 2.0))
  rs = np.random.RandomState(0)
  boxes, _, valid = _gt(rs, [3, 1])
  labels, targets = jax.vmap(losses.rpn_targets, in_axes=(0, 0, None))(boxes, valid, anchors)
  pos, neg = jax.vmap(lambda k, lab: matcher.balanced_sample(k, lab == 1, lab == 0, 256, 0.5))(
      jax.random.split(jax.random.key(2), 2), labels)
  objectness = rs.randn(2, len(anchors)).astype(np.float32)
  deltas = (0.3 * rs.randn(2, len(anchors), 4)).astype(np.float32)

  t_anchors = [torch.from_numpy(anchors)] * 2
  t_labels, matched = rpn.assign_targets_to_anchors(t_anchors, [{"boxes": torch.from_numpy(boxes[i, valid[i]])}
                                                                for i in range(2)])
  t_targets = rpn.box_coder.encode(matched, t_anchors)
  np.testing.assert_array_equal(np.asarray(labels), torch.stack(t_labels).numpy())
  positive = np.asarray(labels) == 1
  assert 0 < positive.sum() and (np.asarray(labels) == -1).any()
  np.testing.assert_allclose(np.asarray(targets)[positive], torch.cat(t_targets).numpy()[positive.reshape(-1)],
                             rtol=0, atol=1e-5)
  rpn.fg_bg_sampler = lambda _: ([torch.from_numpy(np.asarray(m, np.uint8)) for m in pos],
                                 [torch.from_numpy(np.asarray(m, np.uint8)) for m in neg])
  t_obj = torch.from_numpy(objectness.reshape(-1, 1)).requires_grad_()
  t_del = torch.from_numpy(deltas.reshape(-1, 4)).requires_grad_()
  t_loss = rpn.compute_loss(t_obj, t_del, t_labels, t_targets)
  sum(t_loss).backward()

  def total(o, d):
    out = losses.rpn_loss(o, d, targets, pos, neg)
    return out["loss_objectness"] + out["loss_rpn_box_reg"], out
  (_, ours), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(objectness, deltas)
  for got, want in zip((ours["loss_objectness"], ours["loss_rpn_box_reg"]), t_loss):
    np.testing.assert_allclose(float(got), want.item(), rtol=1e-6)
  assert float(ours["loss_rpn_box_reg"]) > 0
  for got, want in zip(grads, (t_obj.grad.numpy().reshape(objectness.shape), t_del.grad.numpy().reshape(deltas.shape))):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())


@pytest.mark.torch
def test_roi_targets_loss_and_gradients_equal_torchvisions():
  """64 proposals per image (the ground truth among them, as torchvision appends it), ground truth padded to 5,
  an image without any, whose last candidate is a zero box (a padded ground truth, as losses() appends them): the
  labels and targets of assign_targets_to_proposals + encode; fastrcnn_loss on our 32 sampled RoIs of each image
  (8 positive at most) and its gradients (1e-6; the zero box's target would be NaN, and its gradient with it)."""
  torch = import_or_skip("torch")
  from torchvision.models.detection.roi_heads import fastrcnn_loss
  from ssdlite_jax.rcnn import losses
  from tests.torch_reference import torch_fasterrcnn_mobilenet
  heads = torch_fasterrcnn_mobilenet("320").roi_heads
  rs = np.random.RandomState(1)
  boxes, gt_labels, valid = _gt(rs, [4, 0])
  props = _gt(rs, [60, 60], max_boxes=60)[0]
  props = np.concatenate([props, boxes[:, :4] + rs.uniform(-3, 3, (2, 4, 4)).astype(np.float32)], axis=1)  # 64
  props[1, -1] = 0.0
  labels, targets = jax.vmap(losses.roi_targets)(boxes, gt_labels, valid, props)
  pos, neg = jax.vmap(lambda k, lab: matcher.balanced_sample(k, lab > 0, lab == 0, 32, 0.25))(
      jax.random.split(jax.random.key(3), 2), labels)
  sampled = np.array(pos | neg)   # a writable copy: torch indexes with it
  logits = rs.randn(2, 64, 91).astype(np.float32)
  deltas = (0.3 * rs.randn(2, 64, 91, 4)).astype(np.float32)

  t_props = [torch.from_numpy(np.array(p)) for p in props]
  t_gt = [torch.from_numpy(boxes[i, valid[i]]) for i in range(2)]
  idxs, t_labels = heads.assign_targets_to_proposals(t_props, t_gt, [torch.from_numpy(gt_labels[i, valid[i]]).long()
                                                                      for i in range(2)])
  np.testing.assert_array_equal(np.asarray(labels), torch.stack(t_labels).numpy())
  assert (np.asarray(labels)[0] > 0).sum() >= 4 and not np.asarray(labels)[1].any()
  t_targets = [heads.box_coder.encode_single(g[i.clamp(min=0)] if len(g) else torch.zeros_like(p), p)
               for g, i, p in zip(t_gt, idxs, t_props)]
  positive = np.asarray(labels) > 0
  np.testing.assert_allclose(np.asarray(targets)[positive], torch.stack(t_targets).numpy()[positive], rtol=0, atol=1e-5)
  t_logits = torch.from_numpy(logits[sampled]).requires_grad_()
  t_deltas = torch.from_numpy(deltas[sampled].reshape(-1, 91 * 4)).requires_grad_()
  t_loss = fastrcnn_loss(t_logits, t_deltas, [t_labels[i][sampled[i]] for i in range(2)],
                         [t_targets[i][sampled[i]] for i in range(2)])
  sum(t_loss).backward()

  def total(lg, dl):
    out = losses.roi_loss(lg, dl, labels, targets, sampled)
    return out["loss_classifier"] + out["loss_box_reg"], out
  (_, ours), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(logits, deltas)
  for got, want in zip((ours["loss_classifier"], ours["loss_box_reg"]), t_loss):
    np.testing.assert_allclose(float(got), want.item(), rtol=1e-6)
  assert sampled.sum() == 64 and float(ours["loss_box_reg"]) > 0
  g_logits, g_deltas = (np.asarray(g) for g in grads)
  assert not g_logits[~sampled].any() and not g_deltas[~sampled].any()
  np.testing.assert_allclose(g_logits[sampled], t_logits.grad.numpy(), rtol=0,
                             atol=1e-6 * np.abs(t_logits.grad.numpy()).max())
  np.testing.assert_allclose(g_deltas[sampled].reshape(-1, 91 * 4), t_deltas.grad.numpy(), rtol=0,
                             atol=1e-6 * np.abs(t_deltas.grad.numpy()).max())


LR = 0.02   # the recipe's SGD: lr 0.02 (at its global batch), momentum 0.9, weight decay 1e-4 on every parameter
GT = [np.array([[20, 30, 140, 200], [150, 40, 300, 160], [60, 120, 110, 230]], np.float32),
      np.array([[40, 50, 200, 280]], np.float32)]


def _torch_train_step(model, dtype):
  """torchvision's train-mode forward of `model` on two images of different sizes (a 384x448 canvas after its
  transform; 3 and 1 ground-truth boxes), the draws of both samplers recorded, then one SGD step of the recipe.
  Returns (image_list, targets as transformed, proposals, {loss name: float}, {"rpn" | "roi": (pos, neg) masks})."""
  torch = import_or_skip("torch")
  from tests.torch_reference import smooth_images
  rs = np.random.RandomState(5)
  images = [torch.from_numpy(smooth_images(1, h, w, seed=i)[0].transpose(2, 0, 1).copy()).to(dtype)
            for i, (h, w) in enumerate(((240, 320), (300, 250)))]
  targets = [{"boxes": torch.from_numpy(b).to(dtype), "labels": torch.from_numpy(rs.randint(1, 91, len(b))).long()}
             for b in GT]
  recorded = {}

  def recording(name, sampler):
    def sample(labels):
      pos, neg = sampler(labels)
      recorded[name] = ([p.numpy().astype(bool) for p in pos], [n.numpy().astype(bool) for n in neg])
      return pos, neg
    return sample

  model.rpn.fg_bg_sampler = recording("rpn", model.rpn.fg_bg_sampler)
  model.roi_heads.fg_bg_sampler = recording("roi", model.roi_heads.fg_bg_sampler)
  model.train()
  torch.manual_seed(0)
  image_list, t_targets = model.transform(images, targets)
  features = model.backbone(image_list.tensors)
  t_props, rpn_losses = model.rpn(image_list, features, t_targets)
  _, roi_losses = model.roi_heads(features, t_props, image_list.image_sizes, t_targets)
  losses = {**rpn_losses, **roi_losses}
  opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9, weight_decay=1e-4)
  opt.zero_grad()
  sum(losses.values()).backward()
  opt.step()
  return (image_list, t_targets, [p.detach() for p in t_props], {k: v.item() for k, v in losses.items()},
          recorded)


def _batch_and_draws(detector, variables, image_list, t_targets, t_props, recorded, m=5):
  """Our batch (torchvision's transformed images, ground truth padded to m) and torchvision's sampled anchors and
  RoIs as our `masks`. The proposals are the same; their order may differ inside ties of the probability
  (torchvision's train-mode NMS over 3 x 2,000 boxes sorts unstably), so the RoI draws are carried over by box."""
  boxes = np.zeros((2, m, 4), np.float64)
  labels = np.zeros((2, m), np.int32)
  for i, t in enumerate(t_targets):
    boxes[i, :len(t["boxes"])] = t["boxes"].detach().numpy()
    labels[i, :len(t["labels"])] = t["labels"].numpy()
  image = image_list.tensors.detach().numpy().transpose(0, 2, 3, 1)
  batch = {"image": image, "boxes": boxes.astype(image.dtype), "labels": labels, "mask": labels > 0,
           "image_size": np.asarray(image_list.image_sizes, np.int32)}
  canvas = image.shape[1:3]
  assert canvas == (384, 448)   # 320x426 and 384x320 resized
  _, props = jax.jit(lambda v, b: detector._proposals(
      *(lambda pyr: (pyr, *detector.module.apply(v, pyr, method="rpn")))(
          detector.module.apply(v, b["image"], method="features")), canvas, b["image_size"], train=True))(
              variables, batch)
  p = props["boxes"].shape[1]
  roi_pos, roi_neg = np.zeros((2, p + m), bool), np.zeros((2, p + m), bool)
  for i in range(2):
    n = len(t_props[i])
    assert int(np.asarray(props["valid"][i]).sum()) == n
    gap = np.abs(np.asarray(props["boxes"][i, :n])[:, None] - t_props[i].numpy()[None]).max(-1)   # [ours, theirs]
    where = gap.argmin(0)
    assert gap.min(0).max() < 1e-3 and len(set(where.tolist())) == n
    g = len(GT[i])
    for ours, theirs in ((roi_pos, recorded["roi"][0][i]), (roi_neg, recorded["roi"][1][i])):
      ours[i, where], ours[i, p:p + g] = theirs[:n], theirs[n:]
  return batch, {"rpn": tuple(np.stack(x) for x in recorded["rpn"]), "roi": (roi_pos, roi_neg)}


@pytest.mark.torch
def test_sgd_step_float64_equals_torchvisions():
  """One SGD step of the recipe from the same weights, float64 on both sides: torchvision's train-mode forward of
  the released (FrozenBatchNorm2d) layout, and FasterRCNNDetector.losses (train-mode proposals, 2,000 per level and
  image, whole levels here; the ground truth appended) with the anchors and RoIs torchvision's samplers drew handed
  to ours, differentiated and stepped by our optimizer with the frozen stages torchvision's builder freezes
  (features 0-6: zero updates on both sides): the four losses and every tensor's update equal to what torchvision's
  float64 path keeps of float64. It keeps float32 in one place (the RPN's objectness labels are float32, so its BCE
  rounds to float32): measured, loss_objectness 1.0e-9 apart, the other three within 5e-16, every tensor's update
  within 2e-12 of torchvision's."""
  torch = import_or_skip("torch")
  import optax
  from ssdlite_jax import optim, porting
  from ssdlite_jax.zoo import build_model
  from ssdlite_jax.rcnn.configs import fasterrcnn_mobilenet_v3_large_320_fpn_config
  from tests.helpers import assert_same_update
  from tests.torch_reference import state_dict_numpy, torch_fasterrcnn_mobilenet, with_exact_hardsigmoid
  model = with_exact_hardsigmoid(torch_fasterrcnn_mobilenet("320").double())
  start = {k: v.copy() for k, v in state_dict_numpy(model).items()}   # views no more: the step writes in place
  image_list, t_targets, t_props, want, recorded = _torch_train_step(model, torch.float64)
  after = state_dict_numpy(model)
  with jax.enable_x64(True):
    config = fasterrcnn_mobilenet_v3_large_320_fpn_config()
    config.dtype = "float64"
    detector = build_model(config)
    variables = porting.torch_to_flax(start, detector)
    batch, masks = _batch_and_draws(detector, variables, image_list, t_targets, t_props, recorded)

    def total(params):
      terms, counts, _ = detector.losses({"params": params, "batch_stats": variables["batch_stats"]}, batch,
                                         jax.random.key(0), masks)
      return sum(terms.values()), (terms, counts)

    (_, (terms, counts)), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(variables["params"])
    optim_config = optim.default_optim_config()
    optim_config.update(learning_rate=LR, base_batch_size=2, batch_size=2, weight_decay=1e-4, warmup_iters=0,
                        frozen=detector.frozen_modules(backbone_pretrained=True))
    tx, _ = optim.make_optimizer(optim_config, steps_per_epoch=100)
    updates, _ = tx.update(grads, tx.init(variables["params"]), variables["params"])
    params = optax.apply_updates(variables["params"], updates)
    ours = porting.flax_to_torch({"params": params, "batch_stats": variables["batch_stats"]}, detector)
  for name, value in want.items():
    np.testing.assert_allclose(float(terms[name]), value, rtol=5e-9, err_msg=name)
  assert float(counts["roi_positives"]) == masks["roi"][0].sum() > 0 and float(terms["loss_box_reg"]) > 0
  assert {np.asarray(v).dtype for v in ours.values()} == {np.dtype(np.float64)}
  assert_same_update(dict(ours), after, start, 1e-9, 1e-12)
  frozen = [k for k in after if k.startswith("backbone.body.") and int(k.split(".")[2]) <= 6]
  assert frozen and all(np.array_equal(after[k], start[k]) and np.array_equal(ours[k], start[k]) for k in frozen)


@pytest.mark.torch
def test_frozen_backbone_stages_are_torchvisions():
  """optim.frozen's share from the model: for trainable_backbone_layers 0..6 the parameters left out are those
  torchvision's _mobilenet_extractor sets requires_grad=False (3 by default with ImageNet weights: features 0-6;
  all trained from scratch)."""
  import_or_skip("torch")
  from torchvision.models import mobilenet_v3_large
  from torchvision.models.detection.backbone_utils import _mobilenet_extractor
  from torchvision.ops import misc
  from ssdlite_jax import porting
  from ssdlite_jax.rcnn.configs import fasterrcnn_mobilenet_v3_large_320_fpn_config
  from ssdlite_jax.zoo import build_model

  def ours(trainable, pretrained=True):
    config = fasterrcnn_mobilenet_v3_large_320_fpn_config()
    config.trainable_backbone_layers = trainable
    det = build_model(config)
    prefixes = tuple(p + "/" for p in det.frozen_modules(backbone_pretrained=pretrained))
    return {key for coll, path, key, _ in porting.key_map(det)
            if coll == "params" and "/".join(path).startswith(prefixes)}

  for t in range(7):
    extractor = _mobilenet_extractor(mobilenet_v3_large(norm_layer=misc.FrozenBatchNorm2d), True, t)
    want = {f"backbone.{k}" for k, p in extractor.named_parameters() if not p.requires_grad}
    assert ours(t) == want, t
    if t == 3:
      assert ours(None) == want and max(int(k.split(".")[2]) for k in want) == 6
  assert ours(None, pretrained=False) == set() and len(ours(0)) > len(ours(3)) > 0
