"""Model registry and builder: config -> Detector (Flax module + static anchors).

A new SSD variant registers its backbone (a module returning NHWC feature maps and a
`torchvision_modules()` porting map) and, if needed, a head; anchors come from the config.
"""

import copy
import dataclasses
import functools
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ssdlite_jax.ssd import anchors as anchors_lib
from ssdlite_jax import kernels as kernels_lib
from ssdlite_jax.data import coco_labels
from ssdlite_jax.models import layers
from ssdlite_jax.models.heads import SSDLitePredictor, SSDPredictor
from ssdlite_jax.dtypes import wide_dtype
from ssdlite_jax.models.mobilenet_v3 import MobileNetV3SSDLite
from ssdlite_jax.models.resnet import ResNet50SSD
from ssdlite_jax.models.ssd import SSD
from ssdlite_jax.models.vgg import VGG16SSD

BACKBONES = {"mobilenet_v3_large": MobileNetV3SSDLite, "vgg16": VGG16SSD, "resnet50": ResNet50SSD}
HEADS = {"ssdlite": SSDLitePredictor, "ssd": SSDPredictor}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def default_model_config() -> ml_collections.ConfigDict:
  """SSDlite320-MobileNetV3-Large exactly as torchvision's ssdlite320_mobilenet_v3_large(weights=None,
  weights_backbone=None): 91 COCO classes, 320x320 input, [-1, 1] scaling, post-processing defaults."""
  c = ml_collections.ConfigDict()
  c.backbone = "mobilenet_v3_large"
  c.backbone_kwargs = ml_collections.ConfigDict(
      dict(width_mult=1.0, reduced_tail=True, min_depth=16, extra_depths=(512, 256, 256, 128)))
  c.head = "ssdlite"
  c.num_classes = 91
  c.class_names = ()          # label -> name ('' for unused); empty means COCO names when num_classes == 91
  c.image_size = 320
  c.image_mean = (0.5, 0.5, 0.5)
  c.image_std = (0.5, 0.5, 0.5)
  c.anchors = ml_collections.ConfigDict(dict(
      aspect_ratios=((2, 3),) * 6, min_ratio=0.2, max_ratio=0.95, scales=(), steps=(), clip=True))
  c.box_coder_weights = (10.0, 10.0, 5.0, 5.0)
  c.score_thresh = 0.001
  c.nms_thresh = 0.55
  c.topk_candidates = 300
  c.detections_per_img = 300
  c.kernels = "auto"          # 'cpu' (ssdlite_jax.kernels), 'xla' (plain XLA ops), 'auto': 'cpu' on CPU only
  # Compute dtype; params stay float32. 'float64' (params too; needs jax_enable_x64) is for numerical checks.
  c.dtype = "float32"
  return c


def ssd300_vgg16_config() -> ml_collections.ConfigDict:
  """SSD300-VGG16 exactly as torchvision's ssd300_vgg16(weights=None, weights_backbone=None): 300x300 input as
  [0, 255] RGB minus the ImageNet mean (std 1/255), 8,732 anchors on steps 8..300, its post-processing."""
  c = default_model_config()
  c.backbone = "vgg16"
  c.backbone_kwargs = ml_collections.ConfigDict(dict(highres=False))
  c.head = "ssd"
  c.image_size = 300
  c.image_mean = (0.48235, 0.45882, 0.40784)
  c.image_std = (1.0 / 255.0,) * 3
  c.anchors = ml_collections.ConfigDict(dict(
      aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)), min_ratio=0.2, max_ratio=0.95,
      scales=(0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05), steps=(8, 16, 32, 64, 100, 300), clip=True))
  c.score_thresh = 0.01
  c.nms_thresh = 0.45
  c.topk_candidates = 400
  c.detections_per_img = 200
  return c


def ssd512_vgg16_config() -> ml_collections.ConfigDict:
  """SSD512-VGG16 as torchvision's own parts build it (it ships no builder): _vgg_extractor(highres=True), 7 maps
  (64, 32, 16, 8, 6, 4, 1 at 512 px), SSDHead with 4, 6, 6, 6, 4, 4, 4 anchors per location (37,075,166
  parameters, the blog's 37.08 M; 24,660 anchors). Scales 0.07..1.2 on the feature-map grid (no steps) follow
  the one surviving copy of the unreleased builder: torchvision never published them."""
  c = ssd300_vgg16_config()
  c.backbone_kwargs.highres = True
  c.image_size = 512
  c.anchors.aspect_ratios = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,), (2,))
  c.anchors.scales = (0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05, 1.2)
  c.anchors.steps = ()
  return c


def ssd512_resnet50_config() -> ml_collections.ConfigDict:
  """SSD512-ResNet50 of torchvision's unmerged PR #3760 (30.2 COCO AP there), as reconstructed in
  models/resnet.py: 42,704,482 parameters, 6,132 anchors (SSD300's ratios and scales on the 32..1 grid, no
  steps), ImageNet mean/std on [0, 1] input (the SSD class's defaults), SSD's post-processing."""
  c = ssd300_vgg16_config()
  c.backbone = "resnet50"
  c.backbone_kwargs = ml_collections.ConfigDict()
  c.image_size = 512
  c.image_mean = (0.485, 0.456, 0.406)
  c.image_std = (0.229, 0.224, 0.225)
  c.anchors.steps = ()
  return c


# Model configs whose torchvision-layout state_dicts load without a config: name -> config (loading.py).
TORCHVISION_VARIANTS = {"ssdlite320_mobilenet_v3_large": default_model_config, "ssd300_vgg16": ssd300_vgg16_config,
                        "ssd512_vgg16": ssd512_vgg16_config, "ssd512_resnet50": ssd512_resnet50_config}


def variant_name(config: ml_collections.ConfigDict) -> Optional[str]:
  """The TORCHVISION_VARIANTS name with the architecture (backbone, its options, head) of `config`, or None."""
  arch = lambda c: (c.backbone, c.head, c.backbone_kwargs.to_dict())
  return next((name for name, make in TORCHVISION_VARIANTS.items() if arch(make()) == arch(config)), None)


@dataclasses.dataclass(frozen=True, eq=False)
class Detector:
  """A built model: the Flax module, its config, the kernels it runs ('cpu' | 'xla' | 'per_platform':
  config.kernels resolved) and the BN axis name (sync BN).

  Detectors hash and compare by value (the config as built, kernels, axis name), so the jitted functions keyed
  on one (`init`, detect.make_detect_fn, the Predictor) compile once for all equal detectors in a process."""
  module: SSD
  config: ml_collections.ConfigDict
  kernels: str
  bn_axis_name: Optional[str] = None

  def __post_init__(self):  # a copy: the config as built, whatever later happens to the caller's
    object.__setattr__(self, "config", copy.deepcopy(self.config))
    object.__setattr__(self, "_key", (self.config.to_json(sort_keys=True), self.kernels, self.bn_axis_name))

  def __eq__(self, other):
    return isinstance(other, Detector) and self._key == other._key

  def __hash__(self):
    return hash(self._key)

  @property
  def image_size(self):
    return (self.config.image_size, self.config.image_size)

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
        dtype=np.dtype(wide_dtype(DTYPES[self.config.dtype])))

  @property
  def class_names(self) -> Tuple[str, ...]:
    """Names indexed by label: the config's, else COCO's for 91-class weights, else the label numbers."""
    if self.config.class_names:
      return tuple(self.config.class_names)
    if self.config.num_classes == coco_labels.NUM_CLASSES:
      return tuple(coco_labels.coco_class_names())
    return tuple(str(i) for i in range(self.config.num_classes))

  def init(self, rng) -> Dict[str, Any]:
    """Fresh variables {"params", "batch_stats"} with torchvision's from-scratch initialisation (batch_stats
    {} for a model without BatchNorm). Under a trace (jax.eval_shape, an outer jit) it becomes part of that
    program."""
    init = _traced_init if isinstance(rng, jax.core.Tracer) else _init
    return with_batch_stats(init(self, rng))

  def torchvision_modules(self) -> Dict[tuple, tuple]:
    """{flax module path: (torchvision state_dict prefix, kind)} for weight porting."""
    out = {("backbone",) + k: ("backbone." + p, kind)
           for k, (p, kind) in self.module.backbone.torchvision_modules().items()}
    for name in ("classification_head", "regression_head"):
      head = HEADS[self.config.head](self.module.num_anchors, 1)
      out.update({(name,) + k: (p, kind) for k, (p, kind) in head.torchvision_modules(f"head.{name}").items()})
    return out


def _traced_init(detector: Detector, rng):
  x = np.zeros((1,) + detector.image_size + (3,), np.float32)  # numpy: this may first run under a trace
  return detector.module.init(rng, x, train=False)


# Its own program, with XLA's back end at -O0 (an option only a top-level jit takes): a model's init is ~400
# threefry hashes (a fold_in per module level, a draw per tensor) that run once, in milliseconds, but take long to
# optimise. Measured on 2 cores, SSDlite320: 19.8 -> 11.1 s to the first variables (jax 0.12: 34.8 -> 8.9 s).
_init = jax.jit(_traced_init, static_argnums=0, compiler_options={"xla_backend_optimization_level": 0})


def with_batch_stats(variables) -> Dict[str, Any]:
  """{"params", "batch_stats"}: Flax leaves the collection out for a model without BatchNorm (VGG)."""
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def _bound(cls, factories: Dict[str, Any]) -> Dict[str, Any]:
  """The layer factories that module class `cls` takes (VGG and its head build no BatchNorm layers)."""
  names = {f.name for f in dataclasses.fields(cls)}
  return {k: v for k, v in factories.items() if k in names}


def build_model(config: ml_collections.ConfigDict, bn_axis_name: Optional[str] = None) -> Detector:
  """Builds the detector described by a model config (see default_model_config); with `bn_axis_name`, its
  BatchNorm layers average batch statistics over that mapped axis (sync BN in train_step)."""
  if config.backbone not in BACKBONES:
    raise ValueError(f"model.backbone={config.backbone!r}; known: {sorted(BACKBONES)}")
  if config.head not in HEADS:
    raise ValueError(f"model.head={config.head!r}; known: {sorted(HEADS)}")
  if config.dtype not in DTYPES:
    raise ValueError(f"model.dtype={config.dtype!r}; known: {sorted(DTYPES)}")
  dtype = DTYPES[config.dtype]
  if dtype == jnp.float64 and not jax.config.jax_enable_x64:
    raise ValueError("model.dtype='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 or "
                     "jax.config.update('jax_enable_x64', True) first")
  kernels = kernels_lib.resolve(config.kernels)
  factories = layers.layer_factories(kernels, dtype, bn_axis_name)._asdict()
  backbone_cls, head_cls = BACKBONES[config.backbone], HEADS[config.head]
  backbone = backbone_cls(**config.backbone_kwargs.to_dict(), **_bound(backbone_cls, factories))
  num_anchors = anchors_lib.num_anchors_per_location(config.anchors.aspect_ratios)
  module = SSD(backbone=backbone, head=head_cls, num_classes=config.num_classes,
               num_anchors=num_anchors, image_mean=tuple(config.image_mean),
               image_std=tuple(config.image_std), head_kwargs=_bound(head_cls, factories))
  return Detector(module=module, config=config, kernels=kernels, bn_axis_name=bn_axis_name)
