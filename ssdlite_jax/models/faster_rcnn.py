"""Faster R-CNN MobileNetV3-Large FPN's networks, as torchvision's fasterrcnn_mobilenet_v3_large(_320)_fpn builds
them: body (MobileNetV3Body, taps 13 and 16), FPN with LastLevelMaxPool, RPNHead, TwoMLPHead, FastRCNNPredictor.
The family (ssdlite_jax.rcnn) runs the data-dependent parts between them (proposals, RoIAlign, detections)."""

import functools
from typing import Dict, Optional

import flax.linen as nn
import jax.numpy as jnp

from ssdlite_jax.models import layers
from ssdlite_jax.models.fpn import FPN
from ssdlite_jax.models.mobilenet_v3 import MobileNetV3Body
from ssdlite_jax.models.rcnn_heads import FastRCNNPredictor, RPNHead, TwoMLPHead


class FasterRCNNNetworks(nn.Module):
  """The networks, called one stage at a time (`module.apply(variables, x, method=...)`):
  features(images [B, H, W, 3] normalised padded batch) -> pyramid [B, H/32, W/32, 256] x 2 and [B, H/64, W/64, 256];
  rpn(pyramid) -> (objectness [B, A], deltas [B, A, 4]); box(roi_features [R, 7, 7, 256]) -> (class logits [R, K],
  box deltas [R, K, 4]). Calling the module runs all three (initialisation)."""
  body: nn.Module
  fpn: FPN
  rpn_head: RPNHead
  box_head: TwoMLPHead
  box_predictor: FastRCNNPredictor
  norm: str = "frozen_bn"   # the body's norm layers: 'frozen_bn' or 'bn' (porting keys)

  def __call__(self, images, train: bool = False):
    pyramid = self.features(images, train)
    rpn = self.rpn(pyramid)
    return pyramid, rpn, self.box(jnp.zeros((1, 7, 7, pyramid[0].shape[-1]), pyramid[0].dtype))

  def features(self, images, train: bool = False):
    return self.fpn(self.body(images, train))

  def rpn(self, pyramid):
    return self.rpn_head(pyramid)

  def box(self, roi_features):
    return self.box_predictor(self.box_head(roi_features))

  def torchvision_modules(self) -> Dict[tuple, tuple]:
    """{flax module path: (torch prefix, kind)} in torchvision's state_dict order."""
    parts = [("body", self.body.torchvision_modules("backbone.body", self.norm)),
             ("fpn", self.fpn.torchvision_modules("backbone.fpn", len(self.body.taps))),
             ("rpn_head", self.rpn_head.torchvision_modules("rpn.head")),
             ("box_head", self.box_head.torchvision_modules("roi_heads.box_head")),
             ("box_predictor", self.box_predictor.torchvision_modules("roi_heads.box_predictor"))]
    return {(name,) + path: v for name, modules in parts for path, v in modules.items()}


def build_networks(num_classes: int, frozen_bn: bool, kernels: str, dtype, bn_axis_name: Optional[str] = None,
                   width_mult: float = 1.0, reduced_tail: bool = False) -> FasterRCNNNetworks:
  """The networks with torchvision's layers and inits: the body's convs kaiming_normal(fan_out) with
  FrozenBatchNorm2d (eps 1e-5) or BatchNorm2d (eps 1e-5, momentum 0.1; with `bn_axis_name`, synchronised); FPN
  kaiming_uniform(a=1); RPN N(0, 0.01^2); the box head and predictor nn.Linear's init."""
  conv = functools.partial(layers.conv, kernels=kernels, dtype=dtype)
  norm = (layers.FrozenBatchNorm if frozen_bn else
          functools.partial(layers.BatchNorm, momentum=0.9, epsilon=1e-5, axis_name=bn_axis_name, kernels=kernels))
  body_conv = functools.partial(conv, kernel_init=layers.kaiming_fan_out)
  conv_bn = functools.partial(layers.ConvBNAct, conv=body_conv, norm=norm, kernel_init=layers.kaiming_fan_out,
                              depthwise_conv=functools.partial(layers.DepthwiseConv, kernels=kernels, dtype=dtype))
  body = MobileNetV3Body(width_mult, reduced_tail, conv=body_conv, conv_bn=conv_bn)
  return FasterRCNNNetworks(body=body, fpn=FPN(conv=conv), rpn_head=RPNHead(conv=conv),
                            box_head=TwoMLPHead(dtype=dtype), box_predictor=FastRCNNPredictor(num_classes, dtype=dtype),
                            norm="frozen_bn" if frozen_bn else "bn")
