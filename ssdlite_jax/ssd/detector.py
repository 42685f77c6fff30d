"""The SSD family behind the detector contract: SSDlite320 and SSD300/512 (ssd.configs) built from a backbone,
a head and default boxes; its loss is the multibox loss, its detections torchvision's SSD post-processing, its
input a square bilinear resize.

A new SSD variant registers its backbone (a module returning NHWC feature maps and a `torchvision_modules()`
porting map) and, if needed, a head; anchors come from the config.
"""

import dataclasses
import functools
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ssdlite_jax import kernels as kernels_lib, preprocess
from ssdlite_jax.detector import Detector, Loss
from ssdlite_jax.dtypes import compute_dtype, wide_dtype
from ssdlite_jax.models import layers
from ssdlite_jax.models.heads import SSDLitePredictor, SSDPredictor
from ssdlite_jax.models.mobilenet_v3 import MobileNetV3SSDLite
from ssdlite_jax.models.resnet import ResNet50SSD
from ssdlite_jax.models.ssd import SSD
from ssdlite_jax.models.vgg import VGG16SSD
from ssdlite_jax.ssd import anchors as anchors_lib, losses, postprocess

BACKBONES = {"mobilenet_v3_large": MobileNetV3SSDLite, "vgg16": VGG16SSD, "resnet50": ResNet50SSD}
HEADS = {"ssdlite": SSDLitePredictor, "ssd": SSDPredictor}


@dataclasses.dataclass(frozen=True, eq=False)
class SSDDetector(Detector):
  """An SSD: `module` is models.ssd.SSD; inputs are resized to config.image_size squared."""
  LOSS_TERMS = {"classification": "cls", "bbox_regression": "box"}
  EXPORT_FORMATS = ("stablehlo", "tflite", "tflite-int8", "saved_model", "onnx")

  @property
  def image_size(self) -> Tuple[int, int]:
    """(H, W) of the model input."""
    return (self.config.image_size, self.config.image_size)

  @property
  def input_size(self) -> Tuple[int, int]:
    return self.image_size

  @functools.cached_property
  def anchors(self) -> np.ndarray:
    """[A, 4] xyxy px of the model input (float32; float64 for a float64 model), on the backbone's feature-map
    sizes (traced once, on first use)."""
    shapes = jax.eval_shape(lambda: self.module.backbone.init_with_output(
        jax.random.key(0), jnp.zeros((1,) + self.image_size + (3,)), train=False))[0]
    a = self.config.anchors
    return anchors_lib.default_boxes(
        [tuple(s.shape[1:3]) for s in shapes], self.image_size, a.aspect_ratios, a.min_ratio, a.max_ratio,
        scales=a.scales or None, steps=a.steps or None, clip=a.clip,
        dtype=np.dtype(wide_dtype(compute_dtype(self.config.dtype))))

  def postprocess_kwargs(self) -> Dict[str, Any]:
    """The post-processing settings of the config, as keyword arguments of postprocess.postprocess."""
    cfg = self.config
    return dict(score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh, topk_candidates=cfg.topk_candidates,
                detections_per_img=cfg.detections_per_img, weights=tuple(cfg.box_coder_weights))

  def describe(self) -> str:
    cfg = self.config
    return f"{cfg.backbone} + {cfg.head} head, {cfg.image_size} px, {len(self.anchors):,} anchors"

  def example_input(self) -> np.ndarray:
    return np.zeros((1,) + self.image_size + (3,), np.float32)  # numpy: this may first run under a trace

  def prepare(self, sizes) -> Dict[str, np.ndarray]:
    taps_y, taps_x = preprocess.batch_taps(sizes, self.image_size)
    return {"taps_y": taps_y, "taps_x": taps_x}

  def transform(self, canvas, plan):
    return preprocess.resize_batch(canvas, plan["taps_y"], plan["taps_x"])

  def loss(self, variables, batch, rng) -> Loss:
    del rng  # SSD's matching and hard-negative mining are deterministic
    out, updates = self.module.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
    terms = losses.multibox_loss(out["cls_logits"], out["bbox_regression"], self.anchors,
                                 batch["boxes"], batch["labels"], batch["mask"])
    num_positives = terms.pop("num_positives")
    return Loss(total=terms["bbox_regression"] + terms["classification"], terms=terms,
                counts={"num_positives": num_positives}, batch_stats=updates.get("batch_stats", {}))

  def detect(self, variables, images, orig_sizes):
    out = self.module.apply(variables, images, train=False)
    return postprocess.postprocess(out["cls_logits"], out["bbox_regression"], jnp.asarray(self.anchors),
                                   orig_sizes, self.image_size, **self.postprocess_kwargs())

  def serving(self, variables, input_size=None):
    if input_size is not None:
      raise ValueError("--input-size: an SSD export takes images already resized to the model size "
                       "(--image-size sets that size)")
    batch, = jax.export.symbolic_shape("b")
    fn = lambda images, orig_sizes: self.detect(variables, images, orig_sizes)
    args = [jax.ShapeDtypeStruct((batch,) + self.image_size + (3,), jnp.float32),
            jax.ShapeDtypeStruct((batch, 2), jnp.int32)]
    return fn, args, {"images": ["b", *self.image_size, 3, "float32 RGB in [0, 1], resized to the model size"],
                      "orig_sizes": ["b", 2, "int32 (h, w) before the resize"]}

  def postprocess_settings(self) -> Dict[str, Any]:
    cfg = self.config
    return {"score_thresh": cfg.score_thresh, "nms_thresh": cfg.nms_thresh, "topk_candidates": cfg.topk_candidates,
            "detections_per_img": cfg.detections_per_img, "box_coder_weights": list(cfg.box_coder_weights)}

  def torchvision_modules(self) -> Dict[tuple, tuple]:
    out = {("backbone",) + k: ("backbone." + p, kind)
           for k, (p, kind) in self.module.backbone.torchvision_modules().items()}
    for name in ("classification_head", "regression_head"):
      head = HEADS[self.config.head](self.module.num_anchors, 1)
      out.update({(name,) + k: (p, kind) for k, (p, kind) in head.torchvision_modules(f"head.{name}").items()})
    return out

  def imagenet_modules(self) -> Dict[tuple, tuple]:
    backbone = self.module.backbone
    if not hasattr(backbone, "imagenet_modules"):
      return {}
    return {("backbone",) + path: v for path, v in backbone.imagenet_modules().items()}

  def num_classes_of(self, state_dict: Mapping[str, np.ndarray]) -> int:
    """K from the classification head's per-level output biases [A_l * K] (A_l anchors per location)."""
    biases = [prefix + ".bias" for path, (prefix, kind) in self.torchvision_modules().items()
              if path[0] == "classification_head" and kind == "conv"]
    counts = {}
    for key, anchors in zip(biases, self.module.num_anchors):
      size = int(np.shape(state_dict[key])[0])
      if size % anchors:
        raise ValueError(f"{key} has {size} outputs, not a multiple of the level's {anchors} anchors")
      counts[key] = size // anchors
    if len(set(counts.values())) != 1:
      raise ValueError(f"the classification head's levels disagree on the class count: {counts}")
    return next(iter(counts.values()))


def _bound(cls, factories: Dict[str, Any]) -> Dict[str, Any]:
  """The layer factories that module class `cls` takes (VGG and its head build no BatchNorm layers)."""
  names = {f.name for f in dataclasses.fields(cls)}
  return {k: v for k, v in factories.items() if k in names}


def build(config: ml_collections.ConfigDict, bn_axis_name: Optional[str] = None) -> SSDDetector:
  """The SSD a model config describes (ssd.configs); with `bn_axis_name`, its BatchNorm layers average batch
  statistics over that mapped axis (sync BN in train_step)."""
  if config.backbone not in BACKBONES:
    raise ValueError(f"model.backbone={config.backbone!r}; known: {sorted(BACKBONES)}")
  if config.head not in HEADS:
    raise ValueError(f"model.head={config.head!r}; known: {sorted(HEADS)}")
  dtype = compute_dtype(config.dtype)
  kernels = kernels_lib.resolve(config.kernels)
  factories = layers.layer_factories(kernels, dtype, bn_axis_name)._asdict()
  backbone_cls, head_cls = BACKBONES[config.backbone], HEADS[config.head]
  backbone = backbone_cls(**config.backbone_kwargs.to_dict(), **_bound(backbone_cls, factories))
  num_anchors = anchors_lib.num_anchors_per_location(config.anchors.aspect_ratios)
  module = SSD(backbone=backbone, head=head_cls, num_classes=config.num_classes,
               num_anchors=num_anchors, image_mean=tuple(config.image_mean),
               image_std=tuple(config.image_std), head_kwargs=_bound(head_cls, factories))
  return SSDDetector(module=module, config=config, kernels=kernels, bn_axis_name=bn_axis_name)
