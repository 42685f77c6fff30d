"""The model zoo: every family's builder and the torchvision variants by name.

    detector = zoo.build_model(zoo.model_config("ssd300_vgg16"))

A model config's `family` field names its family (a config without one, e.g. of an older checkpoint, is an SSD).
"""

from typing import Callable, Dict, List, Mapping, Optional

import ml_collections

from ssdlite_jax.detector import Detector
from ssdlite_jax.rcnn import configs as rcnn_configs, detector as rcnn_detector
from ssdlite_jax.ssd import configs as ssd_configs, detector as ssd_detector

# family -> (builder(config, bn_axis_name) -> Detector, its default model config)
FAMILIES: Dict[str, tuple] = {
    "ssd": (ssd_detector.build, ssd_configs.ssdlite320_config),
    "rcnn": (rcnn_detector.build, rcnn_configs.fasterrcnn_mobilenet_v3_large_320_fpn_config),
}

# Model configs whose torchvision-layout state_dicts load without a config: name -> config (loading.py).
TORCHVISION_VARIANTS: Dict[str, Callable[[], ml_collections.ConfigDict]] = {
    "ssdlite320_mobilenet_v3_large": ssd_configs.ssdlite320_config,
    "ssd300_vgg16": ssd_configs.ssd300_vgg16_config,
    "ssd512_vgg16": ssd_configs.ssd512_vgg16_config,
    "ssd512_resnet50": ssd_configs.ssd512_resnet50_config,
    # The two share every state_dict key: a file of either loads as the first unless a config says otherwise.
    "fasterrcnn_mobilenet_v3_large_320_fpn": rcnn_configs.fasterrcnn_mobilenet_v3_large_320_fpn_config,
    "fasterrcnn_mobilenet_v3_large_fpn": rcnn_configs.fasterrcnn_mobilenet_v3_large_fpn_config,
}


# Config fields that change a family's state_dict keys but not its architecture: family -> (field, values). A
# Faster R-CNN file in the released layout (FrozenBatchNorm2d, 284 keys) or in weights=None's (BatchNorm2d, 330).
LAYOUT_FIELDS = {"rcnn": ("frozen_bn", (True, False))}


def layouts(config: ml_collections.ConfigDict) -> List[ml_collections.ConfigDict]:
  """`config` in each of its family's state_dict layouts (a list of one for a family with one layout)."""
  field, values = LAYOUT_FIELDS.get(family_of(config), (None, ()))
  out = []
  for value in values or [None]:
    c = ml_collections.ConfigDict(config.to_dict())
    if field:
      c[field] = value
    out.append(c)
  return out


def family_of(config: Mapping) -> str:
  """The family of a model config (dict or ConfigDict); a clear error for an unknown one."""
  family = config.get("family", "ssd")
  if family not in FAMILIES:
    raise ValueError(f"model.family={family!r}; known: {sorted(FAMILIES)}")
  return family


def default_config(family: str = "ssd") -> ml_collections.ConfigDict:
  """The family's default model config (SSD: SSDlite320-MobileNetV3-Large)."""
  return FAMILIES[family][1]()


def model_config(name: str) -> ml_collections.ConfigDict:
  """The model config of a torchvision variant by name (TORCHVISION_VARIANTS)."""
  if name not in TORCHVISION_VARIANTS:
    raise ValueError(f"unknown model {name!r}; known: {', '.join(TORCHVISION_VARIANTS)}")
  return TORCHVISION_VARIANTS[name]()


def variant_name(config: ml_collections.ConfigDict) -> Optional[str]:
  """The TORCHVISION_VARIANTS name with the architecture (family, backbone, its options, head) of `config`, or
  None."""
  arch = lambda c: (family_of(c), c.get("backbone"), c.get("head"), c.backbone_kwargs.to_dict())
  return next((name for name, make in TORCHVISION_VARIANTS.items() if arch(make()) == arch(config)), None)


def build_model(config: ml_collections.ConfigDict, bn_axis_name: Optional[str] = None) -> Detector:
  """Builds the detector described by a model config; with `bn_axis_name`, its BatchNorm layers average batch
  statistics over that mapped axis (sync BN in train_step)."""
  return FAMILIES[family_of(config)][0](config, bn_axis_name)
