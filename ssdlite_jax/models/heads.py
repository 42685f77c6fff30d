"""SSDlite prediction heads: per level, depthwise 3x3 + BN + ReLU6, then a 1x1 conv with bias."""

from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ssdlite_jax.models import layers


class SSDLitePredictor(nn.Module):
  """One head over all levels: features [B, H_l, W_l, C_l] -> [B, sum_l H_l*W_l*A_l, K].

  Flattening is NHWC order (y, x, anchor), so channel a*K + k is class k of anchor a, as torchvision.
  """
  num_anchors: Sequence[int]
  num_outputs: int
  conv: Callable = layers.conv
  conv_bn: Callable = layers.ConvBNAct

  @nn.compact
  def __call__(self, features, train: bool):
    outs = []
    for level, (x, a) in enumerate(zip(features, self.num_anchors)):
      x = self.conv_bn(x.shape[-1], 3, depthwise=True, name=f"level{level}_depthwise")(x, train)
      x = self.conv(a * self.num_outputs, 1, use_bias=True, name=f"level{level}_proj")(x)
      outs.append(x.reshape(x.shape[0], -1, self.num_outputs))
    return jnp.concatenate(outs, axis=1)

  def torchvision_modules(self, prefix: str):
    out = {}
    for level in range(len(self.num_anchors)):
      out[(f"level{level}_depthwise",)] = (f"{prefix}.module_list.{level}.0", "conv_bn")
      out[(f"level{level}_proj",)] = (f"{prefix}.module_list.{level}.1", "conv")
    return out
