"""SSD prediction heads over all feature levels: features [B, H_l, W_l, C_l] -> [B, sum_l H_l*W_l*A_l, K].

Flattening is NHWC order (y, x, anchor), so channel a*K + k is output k of anchor a, as torchvision.
"""

from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ssdlite_jax.models import layers


def _flatten_levels(outputs, num_outputs: int):
  """Per-level [B, H_l, W_l, A_l*K] -> [B, sum_l H_l*W_l*A_l, K]."""
  return jnp.concatenate([x.reshape(x.shape[0], -1, num_outputs) for x in outputs], axis=1)


class SSDLitePredictor(nn.Module):
  """SSDlite's head: per level, depthwise 3x3 + BN + ReLU6, then a 1x1 conv with bias."""
  num_anchors: Sequence[int]
  num_outputs: int
  conv: Callable = layers.conv
  conv_bn: Callable = layers.ConvBNAct

  @nn.compact
  def __call__(self, features, train: bool):
    outs = []
    for level, (x, a) in enumerate(zip(features, self.num_anchors)):
      x = self.conv_bn(x.shape[-1], 3, depthwise=True, name=f"level{level}_depthwise")(x, train)
      outs.append(self.conv(a * self.num_outputs, 1, use_bias=True, name=f"level{level}_proj")(x))
    return _flatten_levels(outs, self.num_outputs)

  def torchvision_modules(self, prefix: str):
    out = {}
    for level in range(len(self.num_anchors)):
      out[(f"level{level}_depthwise",)] = (f"{prefix}.module_list.{level}.0", "conv_bn")
      out[(f"level{level}_proj",)] = (f"{prefix}.module_list.{level}.1", "conv")
    return out


class SSDPredictor(nn.Module):
  """SSD's head (torchvision SSDHead's halves): per level one 3x3 conv with bias, xavier-uniform init."""
  num_anchors: Sequence[int]
  num_outputs: int
  conv: Callable = layers.conv

  @nn.compact
  def __call__(self, features, train: bool):
    outs = [self.conv(a * self.num_outputs, 3, use_bias=True, kernel_init=layers.xavier_init, name=f"level{level}")(x)
            for level, (x, a) in enumerate(zip(features, self.num_anchors))]
    return _flatten_levels(outs, self.num_outputs)

  def torchvision_modules(self, prefix: str):
    return {(f"level{level}",): (f"{prefix}.module_list.{level}", "conv") for level in range(len(self.num_anchors))}
