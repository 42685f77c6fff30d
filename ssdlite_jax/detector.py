"""The detector contract: what every family (ssdlite_jax.ssd, ...) provides and the generic stages call.

The train step calls `loss`, the Predictor, evaluation and export call `prepare` / `transform` / `detect`, porting
and loading call `torchvision_modules` / `num_classes_of`, checkpoints rebuild a detector from its config (the
config's `family` names the family, see ssdlite_jax.zoo). Nothing here names a family's head outputs, anchors or
config fields beyond `num_classes`, `class_names`, `kernels` and `dtype`.
"""

import copy
import dataclasses
from typing import Any, ClassVar, Dict, Mapping, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from ssdlite_jax.data import coco_labels

Variables = Dict[str, Any]


class Loss(NamedTuple):
  """A detector's training loss on one device's share of the batch: `total` (the scalar differentiated), `terms`
  {name: scalar} its components (averaged over devices by the step), `counts` {name: scalar} (summed over devices),
  `batch_stats` the updated BN statistics ({} without BatchNorm)."""
  total: Any
  terms: Dict[str, Any]
  counts: Dict[str, Any]
  batch_stats: Any


@dataclasses.dataclass(frozen=True, eq=False)
class Detector:
  """A built model: the Flax module, its config, the kernels it runs ('cpu' | 'xla' | 'per_platform':
  config.kernels resolved) and the BN axis name (sync BN). Families subclass it and implement the methods that
  raise NotImplementedError here.

  Detectors hash and compare by value (class, the config as built, kernels, axis name), so the jitted functions
  keyed on one (`init`, detect.make_detect_fn, the Predictor) compile once for all equal detectors in a process."""
  module: nn.Module
  config: ml_collections.ConfigDict
  kernels: str
  bn_axis_name: Optional[str] = None

  LOSS_TERMS: ClassVar[Mapping[str, str]] = {}   # {Loss.terms name: short name in the progress bar}
  BATCH_KEYS: ClassVar[Tuple[str, ...]] = ("image", "boxes", "labels", "mask")   # the train batch `loss` reads
  EXPORT_FORMATS: ClassVar[Tuple[str, ...]] = ()  # export.py's formats the family builds
  SCORE_THRESH_FIELD: ClassVar[str] = "score_thresh"   # the config field of the detections' score threshold

  def __post_init__(self):  # a copy: the config as built, whatever later happens to the caller's
    object.__setattr__(self, "config", copy.deepcopy(self.config))
    object.__setattr__(self, "_key", (type(self).__name__, self.config.to_json(sort_keys=True), self.kernels,
                                      self.bn_axis_name))

  def __eq__(self, other):
    return isinstance(other, Detector) and self._key == other._key

  def __hash__(self):
    return hash(self._key)

  @property
  def class_names(self) -> Tuple[str, ...]:
    """Names indexed by label: the config's, else COCO's for 91-class weights, else the label numbers."""
    if self.config.class_names:
      return tuple(self.config.class_names)
    if self.config.num_classes == coco_labels.NUM_CLASSES:
      return tuple(coco_labels.coco_class_names())
    return tuple(str(i) for i in range(self.config.num_classes))

  @property
  def input_size(self) -> Optional[Tuple[int, int]]:
    """(H, W) the data pipelines resize every image to, or None where the family's transform resizes each image
    itself (then the pipelines hand it the decoded images)."""
    return None

  def resized_size(self, size: Tuple[int, int]) -> Tuple[int, int]:
    """(h', w') an image of `size` (h, w) becomes in the model input, where input_size is None: the training
    pipeline resizes each image so and pads the batch to a canvas of multiples of `size_divisible`."""
    raise NotImplementedError

  @property
  def size_divisible(self) -> int:
    """The side multiple of the training canvas, where input_size is None."""
    raise NotImplementedError

  def frozen_modules(self, backbone_pretrained: bool) -> Tuple[str, ...]:
    """Module paths ('body/stem') the recipe leaves out of the optimizer (optim.frozen adds to them), given whether
    the backbone starts from ImageNet weights (torchvision's trainable_backbone_layers default depends on it)."""
    return ()

  def init(self, rng) -> Variables:
    """Fresh variables {"params", "batch_stats"} with torchvision's from-scratch initialisation (batch_stats
    {} for a model without BatchNorm). Under a trace (jax.eval_shape, an outer jit) it becomes part of that
    program."""
    init = _traced_init if isinstance(rng, jax.core.Tracer) else _init
    return with_batch_stats(init(self, rng))

  # --- what a family implements -------------------------------------------------------------------------------

  def describe(self) -> str:
    """The architecture in a few words, for train.py's start-up line."""
    raise NotImplementedError

  def example_input(self) -> np.ndarray:
    """A model input of batch 1 (numpy zeros) on which the module initialises."""
    raise NotImplementedError

  def prepare(self, sizes) -> Dict[str, np.ndarray]:
    """Host side of the input transform for images of `sizes` [(h, w), ...]: numpy arrays for `transform` (their
    shapes fix the compiled program)."""
    raise NotImplementedError

  def transform(self, canvas, plan):
    """uint8 canvas [B, Hc, Wc, 3] (images top-left aligned) and `prepare`'s plan -> the model input `detect` takes
    (SSD: images [B, S, S, 3] float32 in [0, 1]; Faster R-CNN: {"images": the normalised padded batch,
    "image_sizes"})."""
    raise NotImplementedError

  def loss(self, variables: Variables, batch: Dict[str, Any], rng) -> Loss:
    """The training loss of a batch (BATCH_KEYS of the training pipeline's: "image" float32 [B, H, W, 3] in [0, 1],
    "boxes" [B, M, 4] xyxy px of it, "labels" [B, M] int32, "mask" [B, M] bool, and the family's own keys: Faster
    R-CNN's "image_size" int32 [B, 2], each image's resized (h, w) on the zero-padded canvas), the model in train
    mode; `rng` for the family's sampling."""
    raise NotImplementedError

  def detect(self, variables: Variables, images, orig_sizes) -> Dict[str, Any]:
    """The model input (transform's), orig_sizes int32 [B, 2] (h, w) -> padded detections {boxes [B, D, 4] xyxy
    original px, scores [B, D], labels [B, D] int32, valid [B, D] bool} sorted by score."""
    raise NotImplementedError

  def serving(self, variables: Variables, input_size: Optional[Tuple[int, int]] = None):
    """What the whole-function export formats (stablehlo) serialise: (fn with `variables` baked in, the argument
    specs with batch dimension `b` = jax.export.symbolic_shape("b"), {input name: description}), for images of
    `input_size` (h, w) where the family's program depends on it."""
    raise NotImplementedError

  def postprocess_settings(self) -> Dict[str, Any]:
    """The config's post-processing fields (an export's metadata)."""
    raise NotImplementedError

  def torchvision_modules(self) -> Dict[tuple, tuple]:
    """{flax module path: (torchvision state_dict prefix, kind)} for weight porting (see porting)."""
    raise NotImplementedError

  def imagenet_modules(self) -> Dict[tuple, tuple]:
    """torchvision_modules of the backbone's ImageNet classifier file, {} where the family has no import."""
    return {}

  def num_classes_of(self, state_dict: Mapping[str, np.ndarray]) -> int:
    """K (with background) of a torchvision state_dict with this detector's keys."""
    raise NotImplementedError


def _traced_init(detector: Detector, rng):
  return detector.module.init(rng, detector.example_input(), train=False)


# Its own program, with XLA's back end at -O0 (an option only a top-level jit takes): a model's init is ~400
# threefry hashes (a fold_in per module level, a draw per tensor) that run once, in milliseconds, but take long to
# optimise. Measured on 2 cores, SSDlite320: 19.8 -> 11.1 s to the first variables (jax 0.12: 34.8 -> 8.9 s).
_init = jax.jit(_traced_init, static_argnums=0, compiler_options={"xla_backend_optimization_level": 0})


def with_batch_stats(variables) -> Variables:
  """{"params", "batch_stats"}: Flax leaves the collection out for a model without BatchNorm (VGG)."""
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
