"""Faster R-CNN's heads as torchvision builds them: RPNHead (shared over the pyramid levels), TwoMLPHead and
FastRCNNPredictor, on NHWC features."""

import math
from typing import Callable, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssdlite_jax.dtypes import wide_dtype
from ssdlite_jax.models import layers

rpn_init = nn.initializers.normal(stddev=0.01)                                  # RPNHead: N(0, 0.01^2), bias 0


class RPNHead(nn.Module):
  """features: the pyramid [B, H_l, W_l, C] -> (objectness logits [B, A], deltas [B, A, 4]) over all levels,
  A = sum_l H_l * W_l * num_anchors in (level, y, x, anchor) order: 3x3 conv + ReLU, then 1x1 convs."""
  num_anchors: int = 15
  conv: Callable = layers.conv

  @nn.compact
  def __call__(self, features):
    channels = features[0].shape[-1]
    conv = lambda n, k, name: self.conv(n, k, use_bias=True, kernel_init=rpn_init, name=name)
    shared, cls, box = conv(channels, 3, "conv"), conv(self.num_anchors, 1, "cls_logits"), conv(
        4 * self.num_anchors, 1, "bbox_pred")
    logits, deltas = [], []
    for x in features:
      t = nn.relu(shared(x))
      logits.append(cls(t).reshape(x.shape[0], -1))
      deltas.append(box(t).reshape(x.shape[0], -1, 4))
    return jnp.concatenate(logits, axis=1), jnp.concatenate(deltas, axis=1)

  def torchvision_modules(self, prefix: str) -> Dict[tuple, tuple]:
    return {("conv",): (f"{prefix}.conv.0.0", "conv"), ("cls_logits",): (f"{prefix}.cls_logits", "conv"),
            ("bbox_pred",): (f"{prefix}.bbox_pred", "conv")}


def _linear(features: int, fan_in: int, dtype, name: str) -> nn.Dense:
  """torch's nn.Linear: kernel and bias U(+-1/sqrt(fan_in)) (kaiming_uniform(a=sqrt(5)) is that bound too)."""
  bound = 1.0 / math.sqrt(fan_in)
  init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
  return nn.Dense(features, kernel_init=init, bias_init=init, dtype=dtype, param_dtype=wide_dtype(dtype), name=name)


class TwoMLPHead(nn.Module):
  """RoI features [R, 7, 7, C] -> [R, representation]: fc6 on the NHWC flatten (its kernel rows in (y, x, c)
  order; porting permutes torch's NCHW flatten) + ReLU, fc7 + ReLU."""
  representation: int = 1024
  dtype: type = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(_linear(self.representation, x.shape[-1], self.dtype, "fc6")(x))
    return nn.relu(_linear(self.representation, x.shape[-1], self.dtype, "fc7")(x))

  def torchvision_modules(self, prefix: str) -> Dict[tuple, tuple]:
    return {("fc6",): (f"{prefix}.fc6", "linear_nchw"), ("fc7",): (f"{prefix}.fc7", "linear")}


class FastRCNNPredictor(nn.Module):
  """[R, representation] -> (class logits [R, K], box deltas [R, K, 4])."""
  num_classes: int
  dtype: type = jnp.float32

  @nn.compact
  def __call__(self, x):
    logits = _linear(self.num_classes, x.shape[-1], self.dtype, "cls_score")(x)
    deltas = _linear(4 * self.num_classes, x.shape[-1], self.dtype, "bbox_pred")(x)
    return logits, deltas.reshape(x.shape[0], self.num_classes, 4)

  def torchvision_modules(self, prefix: str) -> Dict[tuple, tuple]:
    return {("cls_score",): (f"{prefix}.cls_score", "linear"), ("bbox_pred",): (f"{prefix}.bbox_pred", "linear")}
