"""MobileNetV3-Large feature extractors: SSDlite's (MobileNetV3SSDLite, as torchvision builds it without a pretrained
backbone) and Faster R-CNN's FPN body (MobileNetV3Body).

SSDlite's: reduced tail (C4/C5 channels halved), width_mult, min_depth 16; two taps: the expansion output of the
C4 block (672 x 20 x 20 at 320 px) and the last conv (480 x 10 x 10); then four depthwise-separable extra blocks.
All feature maps are NHWC.
"""

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from ssdlite_jax.models import layers


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
  """torchvision's _make_divisible: round to a multiple of `divisor`, never below 90% of v."""
  min_value = min_value or divisor
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


class BlockConfig(NamedTuple):
  in_ch: int
  kernel: int
  expanded: int
  out_ch: int
  use_se: bool
  activation: str
  stride: int


def large_config(width_mult: float = 1.0, reduced_tail: bool = True) -> Tuple[List[BlockConfig], int]:
  """torchvision's MobileNetV3-Large bneck table (blocks 1..15) and the last conv's channels."""
  r = 2 if reduced_tail else 1
  table = [
      (16, 3, 16, 16, False, "relu", 1),
      (16, 3, 64, 24, False, "relu", 2),
      (24, 3, 72, 24, False, "relu", 1),
      (24, 5, 72, 40, True, "relu", 2),
      (40, 5, 120, 40, True, "relu", 1),
      (40, 5, 120, 40, True, "relu", 1),
      (40, 3, 240, 80, False, "hardswish", 2),
      (80, 3, 200, 80, False, "hardswish", 1),
      (80, 3, 184, 80, False, "hardswish", 1),
      (80, 3, 184, 80, False, "hardswish", 1),
      (80, 3, 480, 112, True, "hardswish", 1),
      (112, 3, 672, 112, True, "hardswish", 1),
      (112, 5, 672, 160 // r, True, "hardswish", 2),
      (160 // r, 5, 960 // r, 160 // r, True, "hardswish", 1),
      (160 // r, 5, 960 // r, 160 // r, True, "hardswish", 1),
  ]
  adj = lambda c: make_divisible(c * width_mult, 8)
  blocks = [BlockConfig(adj(i), k, adj(e), adj(o), se, a, s) for i, k, e, o, se, a, s in table]
  return blocks, 6 * blocks[-1].out_ch


class SqueezeExcitation(nn.Module):
  """Global average pool -> 1x1 conv + ReLU -> 1x1 conv + Hardsigmoid -> channel gate."""
  squeeze: int
  conv: Callable = layers.conv

  @nn.compact
  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.relu(self.conv(self.squeeze, use_bias=True, name="fc1")(s))
    s = nn.hard_sigmoid(self.conv(x.shape[-1], use_bias=True, name="fc2")(s))
    return x * s


class InvertedResidual(nn.Module):
  """MobileNetV3 bneck: [expand 1x1] -> depthwise kxk -> [SE] -> project 1x1 (+ residual).

  Returns (expansion output, block output): the first is SSDlite's C4 tap.
  """
  cfg: BlockConfig
  conv: Callable = layers.conv
  conv_bn: Callable = layers.ConvBNAct

  @nn.compact
  def __call__(self, x, train: bool):
    cfg = self.cfg
    h = x
    if cfg.expanded != cfg.in_ch:
      h = self.conv_bn(cfg.expanded, 1, activation=cfg.activation, name="expand")(h, train)
    expanded = h
    h = self.conv_bn(cfg.expanded, cfg.kernel, cfg.stride, depthwise=True, activation=cfg.activation,
                     name="depthwise")(h, train)
    if cfg.use_se:
      h = SqueezeExcitation(make_divisible(cfg.expanded // 4, 8), self.conv, name="se")(h)
    h = self.conv_bn(cfg.out_ch, 1, activation="none", name="project")(h, train)
    if cfg.stride == 1 and cfg.in_ch == cfg.out_ch:
      h = h + x
    return expanded, h


class MobileNetV3SSDLite(nn.Module):
  """SSDlite feature extractor: MobileNetV3-Large taps + 4 extra blocks -> 6 NHWC feature maps."""
  width_mult: float = 1.0
  reduced_tail: bool = True
  min_depth: int = 16
  extra_depths: Sequence[int] = (512, 256, 256, 128)
  c4_pos: int = 13
  conv: Callable = layers.conv
  conv_bn: Callable = layers.ConvBNAct

  @nn.compact
  def __call__(self, x, train: bool):
    blocks, last_ch = large_config(self.width_mult, self.reduced_tail)
    conv_bn = self.conv_bn
    x = conv_bn(blocks[0].in_ch, 3, 2, activation="hardswish", name="stem")(x, train)
    features = []
    for i, cfg in enumerate(blocks, start=1):
      expanded, x = InvertedResidual(cfg, self.conv, conv_bn, name=f"block{i}")(x, train)
      if i == self.c4_pos:
        features.append(expanded)
    x = conv_bn(last_ch, 1, activation="hardswish", name="last_conv")(x, train)
    features.append(x)
    for k, depth in enumerate(self.extra_depths):
      out_ch = max(self.min_depth, int(depth * self.width_mult))
      mid = out_ch // 2
      x = conv_bn(mid, 1, name=f"extra{k}_reduce")(x, train)
      x = conv_bn(mid, 3, 2, depthwise=True, name=f"extra{k}_depthwise")(x, train)
      x = conv_bn(out_ch, 1, name=f"extra{k}_expand")(x, train)
      features.append(x)
    return features

  def torchvision_modules(self):
    """{flax module path: (torchvision state_dict prefix, kind)}; kind 'conv_bn' or 'conv'."""
    blocks, _ = large_config(self.width_mult, self.reduced_tail)
    out = {("stem",): ("features.0.0", "conv_bn")}
    for i, cfg in enumerate(blocks, start=1):
      stage = "features.0" if i < self.c4_pos else "features.1"
      parts = (["expand"] if cfg.expanded != cfg.in_ch else []) + ["depthwise"]
      parts += (["se"] if cfg.use_se else []) + ["project"]
      for j, part in enumerate(parts):
        if i == self.c4_pos:  # the C4 block is split: expansion in stage 0, the rest in stage 1
          prefix = f"features.0.{i}" if part == "expand" else f"features.1.0.{j}"
        else:
          idx = i if i < self.c4_pos else i - self.c4_pos
          prefix = f"{stage}.{idx}.block.{j}"
        if part == "se":
          out[(f"block{i}", "se", "fc1")] = (prefix + ".fc1", "conv")
          out[(f"block{i}", "se", "fc2")] = (prefix + ".fc2", "conv")
        else:
          out[(f"block{i}", part)] = (prefix, "conv_bn")
    out[("last_conv",)] = (f"features.1.{len(blocks) - self.c4_pos + 1}", "conv_bn")
    for k in range(len(self.extra_depths)):
      for j, part in enumerate(("reduce", "depthwise", "expand")):
        out[(f"extra{k}_{part}",)] = (f"extra.{k}.{j}", "conv_bn")
    return out


class MobileNetV3Body(nn.Module):
  """MobileNetV3-Large features 0..16 as torchvision's _mobilenet_extractor(fpn=True) keeps them (stem, blocks
  1..15, last conv; no dilation) -> the outputs of the feature indices `taps`, NHWC. Faster R-CNN: the full tail
  and taps (13, 16), 160 x H/32 x W/32 and 960 x H/32 x W/32 (block 13 is the last stride-2 block)."""
  width_mult: float = 1.0
  reduced_tail: bool = False
  taps: Sequence[int] = (13, 16)
  conv: Callable = layers.conv
  conv_bn: Callable = layers.ConvBNAct

  @nn.compact
  def __call__(self, x, train: bool):
    blocks, last_ch = large_config(self.width_mult, self.reduced_tail)
    x = self.conv_bn(blocks[0].in_ch, 3, 2, activation="hardswish", name="stem")(x, train)
    outputs = []
    for i, cfg in enumerate(blocks, start=1):
      _, x = InvertedResidual(cfg, self.conv, self.conv_bn, name=f"block{i}")(x, train)
      if i in self.taps:
        outputs.append(x)
    x = self.conv_bn(last_ch, 1, activation="hardswish", name="last_conv")(x, train)
    if len(blocks) + 1 in self.taps:
      outputs.append(x)
    return outputs

  def feature_names(self) -> Tuple[str, ...]:
    """The submodule of torchvision's features.{i}, by i."""
    blocks, _ = large_config(self.width_mult, self.reduced_tail)
    return ("stem",) + tuple(f"block{i}" for i in range(1, len(blocks) + 1)) + ("last_conv",)

  def torchvision_modules(self, prefix: str, norm: str) -> Dict[tuple, tuple]:
    """{flax module path: (torch prefix, kind)} with features.{i} at `prefix`.{i} ('backbone.body' in the detector,
    'features' in the ImageNet classifier); `norm` 'bn' or 'frozen_bn'."""
    blocks, _ = large_config(self.width_mult, self.reduced_tail)
    conv_bn = "conv_bn" if norm == "bn" else "conv_frozen_bn"
    out = {("stem",): (f"{prefix}.0", conv_bn)}
    for i, cfg in enumerate(blocks, start=1):
      parts = (["expand"] if cfg.expanded != cfg.in_ch else []) + ["depthwise"]
      parts += (["se"] if cfg.use_se else []) + ["project"]
      for j, part in enumerate(parts):
        key = f"{prefix}.{i}.block.{j}"
        if part == "se":
          out[(f"block{i}", "se", "fc1")] = (key + ".fc1", "conv")
          out[(f"block{i}", "se", "fc2")] = (key + ".fc2", "conv")
        else:
          out[(f"block{i}", part)] = (key, conv_bn)
    out[("last_conv",)] = (f"{prefix}.{len(blocks) + 1}", conv_bn)
    return out
