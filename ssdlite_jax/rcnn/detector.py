"""The Faster R-CNN family behind the detector contract: fasterrcnn_mobilenet_v3_large_320_fpn and _fpn
(rcnn.configs). Inference: transform (resize keeping the aspect ratio, padded canvas) -> body + FPN -> RPN head ->
proposals per image -> RoIAlign on FPN level '0' (torchvision's MultiScaleRoIAlign maps every RoI there) -> box
head -> detections, rescaled to the original image."""

import dataclasses
import functools
import math
from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax
import numpy as np

from ssdlite_jax import kernels as kernels_lib
from ssdlite_jax.detector import Detector, Loss
from ssdlite_jax.dtypes import compute_dtype, wide_dtype
from ssdlite_jax.models.faster_rcnn import build_networks
from ssdlite_jax.rcnn import anchors as anchors_lib, losses, matcher, postprocess, proposals, roi_align, transform

ROI_LEVEL = 0   # the pyramid level every RoI is pooled from
RPN_BATCH, RPN_POSITIVE_FRACTION = 256, 0.5   # anchors sampled per image for the RPN's losses
ROI_BATCH, ROI_POSITIVE_FRACTION = 512, 0.25  # RoIs sampled per image for the box head's losses
# trainable stages t -> features frozen before this index: stage starts [0, 2, 4, 7, 13, 16]; t = 0 freezes all 17
FREEZE_BEFORE = {0: 17, 1: 16, 2: 13, 3: 7, 4: 4, 5: 2, 6: 0}


@dataclasses.dataclass(frozen=True, eq=False)
class FasterRCNNDetector(Detector):
  """A Faster R-CNN MobileNetV3-Large FPN: `module` is models.faster_rcnn.FasterRCNNNetworks; inputs are
  {"images": the normalised padded batch [B, H, W, 3], "image_sizes": int32 [B, 2] resized (h, w)}."""
  # RoIAlign and the proposals' data-dependent selection are built in JAX only: no LiteRT / ONNX graphs yet.
  EXPORT_FORMATS = ("stablehlo",)
  SCORE_THRESH_FIELD = "box_score_thresh"
  LOSS_TERMS = {"loss_objectness": "obj", "loss_rpn_box_reg": "rpn", "loss_classifier": "cls", "loss_box_reg": "box"}
  BATCH_KEYS = Detector.BATCH_KEYS + ("image_size",)

  def describe(self) -> str:
    cfg = self.config
    return (f"MobileNetV3-Large FPN ({'FrozenBatchNorm' if cfg.frozen_bn else 'BatchNorm'}) + Faster R-CNN heads, "
            f"min/max size {cfg.min_size}/{cfg.max_size}")

  def resized_size(self, size):
    return transform.resized_size(*size, self.config.min_size, self.config.max_size)

  @property
  def size_divisible(self) -> int:
    return self.config.size_divisible

  def frozen_modules(self, backbone_pretrained: bool):
    """The body's features before stage_indices[6 - t] (t = trainable_backbone_layers; None: 3 from ImageNet
    weights, else all 6, as torchvision): t = 3 leaves features 0-6 out."""
    t = self.config.trainable_backbone_layers
    t = (3 if backbone_pretrained else 6) if t is None else t
    if not 0 <= t <= 6:
      raise ValueError(f"model.trainable_backbone_layers={t}: 0..6")
    return tuple(f"body/{name}" for name in self.module.body.feature_names()[:FREEZE_BEFORE[t]])

  def example_input(self) -> np.ndarray:
    return np.zeros((1, 64, 64, 3), np.float32)

  def prepare(self, sizes) -> Dict[str, Any]:
    cfg = self.config
    return transform.plan(sizes, cfg.min_size, cfg.max_size, cfg.size_divisible)

  def transform(self, canvas, plan):
    return {"images": transform.apply(canvas, plan, self.config.image_mean, self.config.image_std),
            "image_sizes": plan["image_sizes"]}

  def anchors(self, pyramid, canvas) -> np.ndarray:
    """[A, 4] xyxy px of the (H, W) canvas for the pyramid's (static) grid sizes."""
    return anchors_lib.grid_anchors([tuple(p.shape[1:3]) for p in pyramid], tuple(canvas), self.config.anchor_sizes,
                                    self.config.aspect_ratios)

  def _proposals(self, pyramid, objectness, deltas, canvas, image_sizes, train: bool):
    """(anchors [A, 4] of the canvas, proposals {"boxes" [B, P, 4], "scores" [B, P], "valid" [B, P]}) from the RPN
    outputs (not differentiated through, as torchvision detaches them), with the train or inference top-n."""
    cfg = self.config
    pre, post = ((cfg.rpn_pre_nms_top_n_train, cfg.rpn_post_nms_top_n_train) if train
                 else (cfg.rpn_pre_nms_top_n, cfg.rpn_post_nms_top_n))
    anchors = self.anchors(pyramid, canvas)
    level_sizes = [p.shape[1] * p.shape[2] * len(cfg.anchor_sizes) * len(cfg.aspect_ratios) for p in pyramid]
    wide = wide_dtype(objectness.dtype)
    props = jax.vmap(functools.partial(
        proposals.propose, anchors=jnp.asarray(anchors), level_sizes=level_sizes, pre_nms_top_n=pre,
        post_nms_top_n=post, nms_thresh=cfg.rpn_nms_thresh, score_thresh=cfg.rpn_score_thresh))(
            lax.stop_gradient(objectness).astype(wide), lax.stop_gradient(deltas).astype(wide),
            image_size=jnp.asarray(image_sizes).astype(wide))
    return anchors, props

  def propose(self, variables, inputs):
    """inputs (transform's) -> (the pyramid, proposals {"boxes" [B, P, 4] xyxy px of the resized images, "scores"
    [B, P], "valid" [B, P]}) as the RPN gives them at inference."""
    images = inputs["images"]
    pyramid = self.module.apply(variables, images, method="features")
    objectness, deltas = self.module.apply(variables, pyramid, method="rpn")
    _, props = self._proposals(pyramid, objectness, deltas, images.shape[1:3], inputs["image_sizes"], train=False)
    return pyramid, props

  def _pool(self, variables, pyramid, boxes, canvas):
    """RoIAlign of boxes [B, R, 4] on the RoI level, then the box head -> (logits [B, R, K], deltas [B, R, K, 4])."""
    b, r = boxes.shape[:2]
    level = pyramid[ROI_LEVEL]
    scale = 2.0 ** round(math.log2(level.shape[1] / canvas[0]))
    rois = roi_align.roi_align(level, boxes.reshape(b * r, 4), jnp.repeat(jnp.arange(b), r), scale)
    logits, deltas = self.module.apply(variables, rois, method="box")
    return logits.reshape(b, r, -1), deltas.reshape(b, r, -1, 4)

  def detect(self, variables, inputs, orig_sizes):
    pyramid, props = self.propose(variables, inputs)
    return self.roi_detections(variables, pyramid, props, inputs, orig_sizes)

  def roi_detections(self, variables, pyramid, props, inputs, orig_sizes):
    """The RoI heads' stage: pyramid and proposals (propose's) -> padded detections in original pixels (detect)."""
    cfg = self.config
    logits, box_deltas = self._pool(variables, pyramid, props["boxes"], inputs["images"].shape[1:3])
    sizes = jnp.asarray(inputs["image_sizes"]).astype(jnp.float32)
    dets = jax.vmap(functools.partial(
        postprocess.detections, score_thresh=cfg.box_score_thresh, nms_thresh=cfg.box_nms_thresh,
        detections_per_img=cfg.detections_per_img, weights=tuple(cfg.box_coder_weights)))(
            logits, box_deltas, props["boxes"], props["valid"], sizes)
    ratio = jnp.asarray(orig_sizes, jnp.float32) / sizes                                     # [B, 2] (h, w)
    return {**dets, "boxes": dets["boxes"] * jnp.stack([ratio[:, 1], ratio[:, 0]] * 2, axis=-1)[:, None]}

  def serving(self, variables, input_size=None):
    """The transform included: uint8 RGB images [b, h, w, 3] of `input_size` (h, w) (default: 480 x 640), on
    torchvision's canvas for that size, exactly as the Predictor runs them."""
    h, w = input_size or (480, 640)
    batch, = jax.export.symbolic_shape("b")
    one = self.prepare([(h, w)])

    def fn(images):
      n = images.shape[0]
      plan = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape[1:]), one)
      return self.detect(variables, self.transform(images, plan), jnp.broadcast_to(jnp.array([h, w]), (n, 2)))

    return fn, [jax.ShapeDtypeStruct((batch, h, w, 3), jnp.uint8)], {
        "images": ["b", h, w, 3, "uint8 RGB, unresized (the export resizes, normalises and pads as torchvision)"]}

  def postprocess_settings(self) -> Dict[str, Any]:
    cfg = self.config
    return {k: cfg[k] for k in ("min_size", "max_size", "rpn_pre_nms_top_n", "rpn_post_nms_top_n", "rpn_nms_thresh",
                                "rpn_score_thresh", "box_score_thresh", "box_nms_thresh", "detections_per_img")}

  def loss(self, variables, batch, rng) -> Loss:
    cfg = self.config
    images = transform.normalize(batch["image"], batch["image_size"], cfg.image_mean, cfg.image_std)
    terms, counts, batch_stats = self.losses(variables, {**batch, "image": images}, rng)
    return Loss(total=sum(terms.values()), terms=terms, counts=counts, batch_stats=batch_stats)

  def losses(self, variables, batch, rng, masks=None):
    """torchvision's four training losses of a batch {"image": the normalised padded canvas [B, H, W, 3],
    "image_size" int32 [B, 2] resized (h, w), "boxes" [B, M, 4] xyxy px of it, "labels" [B, M], "mask" [B, M]}
    -> (terms, counts, batch_stats). The RPN samples 256 anchors per image (half positive at most), the RoI heads 512
    of the proposals with the ground truth appended (a quarter positive at most), from `rng`; `masks` {"rpn": (pos,
    neg) [B, A], "roi": (pos, neg) [B, P + M]} gives them instead (parity tests)."""
    cfg, net = self.config, self.module
    images, boxes, labels, valid = batch["image"], batch["boxes"], batch["labels"], batch["mask"]
    canvas = images.shape[1:3]
    pyramid, updates = net.apply(variables, images, True, method="features", mutable=["batch_stats"])
    objectness, deltas = net.apply(variables, pyramid, method="rpn")
    anchors, props = self._proposals(pyramid, objectness, deltas, canvas, batch["image_size"], train=True)
    rpn_keys, roi_keys = (jax.random.split(k, images.shape[0]) for k in jax.random.split(rng))

    rpn_labels, rpn_targets = jax.vmap(losses.rpn_targets, in_axes=(0, 0, None))(boxes, valid, anchors)
    rpn_pos, rpn_neg = masks["rpn"] if masks else jax.vmap(
        lambda k, lab: matcher.balanced_sample(k, lab == 1, lab == 0, RPN_BATCH, RPN_POSITIVE_FRACTION))(
            rpn_keys, rpn_labels)
    terms = losses.rpn_loss(objectness, deltas, rpn_targets, rpn_pos, rpn_neg)

    cand = jnp.concatenate([props["boxes"], boxes.astype(props["boxes"].dtype)], axis=1)   # [B, P + M, 4]
    cand_valid = jnp.concatenate([props["valid"], valid], axis=1)
    roi_labels, roi_targets = jax.vmap(functools.partial(losses.roi_targets, weights=tuple(cfg.box_coder_weights)))(
        boxes, labels, valid, cand)
    roi_pos, roi_neg = masks["roi"] if masks else jax.vmap(
        lambda k, lab, ok: matcher.balanced_sample(k, ok & (lab > 0), ok & (lab == 0), ROI_BATCH,
                                                   ROI_POSITIVE_FRACTION))(roi_keys, roi_labels, cand_valid)
    sampled = roi_pos | roi_neg
    # The sampled RoIs, in candidate order, in min(512, P + M) slots (the rest masked).
    slots = jnp.argsort(~sampled, axis=1, stable=True)[:, :min(ROI_BATCH, cand.shape[1])]
    take = lambda x: jnp.take_along_axis(x, slots.reshape(slots.shape + (1,) * (x.ndim - 2)), axis=1)
    logits, box_deltas = self._pool(variables, pyramid, take(cand), canvas)
    terms.update(losses.roi_loss(logits, box_deltas, take(roi_labels), take(roi_targets), take(sampled)))
    counts = {"rpn_positives": rpn_pos.sum().astype(jnp.float32), "roi_positives": roi_pos.sum().astype(jnp.float32)}
    return terms, counts, updates.get("batch_stats", {})

  def torchvision_modules(self) -> Dict[tuple, tuple]:
    return self.module.torchvision_modules()

  def imagenet_modules(self) -> Dict[tuple, tuple]:
    return {("body",) + path: v for path, v in self.module.body.torchvision_modules(
        "features", self.module.norm).items()}

  def num_classes_of(self, state_dict: Mapping[str, np.ndarray]) -> int:
    return int(np.shape(state_dict["roi_heads.box_predictor.cls_score.bias"])[0])


def build(config: ml_collections.ConfigDict, bn_axis_name: Optional[str] = None) -> FasterRCNNDetector:
  """The Faster R-CNN a model config describes (rcnn.configs)."""
  kernels = kernels_lib.resolve(config.kernels)
  net = build_networks(config.num_classes, config.frozen_bn, kernels, compute_dtype(config.dtype), bn_axis_name,
                       **config.backbone_kwargs.to_dict())
  return FasterRCNNDetector(module=net, config=config, kernels=kernels, bn_axis_name=bn_axis_name)
