"""ResNet50 feature extractor for SSD512-ResNet50, as torchvision's unmerged PR #3760 built it (reconstructed:
torchvision never released the code; see ../shared/reference/torchvision-ssd-vgg-reference.md section 10.2).

torchvision's resnet50 trunk (V1.5 bottlenecks: the stride on the 3x3 conv) with layer4's strides set to 1 and no
dilation -> tap 0 (2048 x 32² at 512 px); then 5 extra blocks (1x1 conv, BN, ReLU, kxk conv, BN, ReLU; no conv
bias) -> 512x16², 512x8², 256x4², 256x2², 256x1². BatchNorm2d with torch's defaults (eps 1e-5, momentum 0.1).

Choices where the reconstruction is unverified: a BN after the last extra block's 2x2 conv (later copies of
the PR have it: 42,704,482 parameters, the blog's 42.70 M; without it 42,703,970); the trunk's convs use
torchvision ResNet's kaiming-normal (fan_out) init, the extras xavier-uniform as torchvision's VGG extras.
"""

import functools
from typing import Callable

import flax.linen as nn

from ssdlite_jax.models import layers

# (bottleneck width, blocks, stride of the first block) of layer1..layer4; layer4's stride is 1 in SSD512.
STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 1))
# Extra blocks: (1x1 reduce channels, out channels, kernel, stride, padding) of the second conv.
EXTRAS = ((256, 512, 3, 2, 1), (256, 512, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 3, 1, 0), (128, 256, 2, 1, 0))
TORCH_BN = dict(momentum=0.9, epsilon=1e-5)   # BatchNorm2d(eps=1e-5, momentum=0.1) in Flax's convention


class Bottleneck(nn.Module):
  """torchvision's Bottleneck: 1x1 -> 3x3 (stride) -> 1x1 (x4 channels), + the (projected) input, ReLU."""
  width: int
  stride: int
  project: bool
  conv_bn: Callable = layers.ConvBNAct

  @nn.compact
  def __call__(self, x, train: bool):
    conv_bn = functools.partial(self.conv_bn, kernel_init=layers.kaiming_fan_out, norm_kwargs=TORCH_BN)
    h = conv_bn(self.width, 1, activation="relu", name="conv1")(x, train)
    h = conv_bn(self.width, 3, self.stride, activation="relu", name="conv2")(h, train)
    h = conv_bn(4 * self.width, 1, activation="none", name="conv3")(h, train)
    if self.project:
      x = conv_bn(4 * self.width, 1, self.stride, activation="none", name="downsample")(x, train)
    return nn.relu(h + x)


class ResNet50SSD(nn.Module):
  """images normalised with ImageNet's mean/std [B, H, W, 3] -> 6 NHWC maps (2048, 512, 512, 256, 256, 256
  channels; 32², 16², 8², 4², 2², 1² at 512 px)."""
  conv_bn: Callable = layers.ConvBNAct

  @nn.compact
  def __call__(self, x, train: bool):
    x = self.conv_bn(64, 7, 2, activation="relu", padding=3, kernel_init=layers.kaiming_fan_out,
                     norm_kwargs=TORCH_BN, name="stem")(x, train)
    x = layers.max_pool(x, 3, 2, padding=1)
    in_ch = 64
    for s, (width, blocks, stride) in enumerate(STAGES, start=1):
      for b in range(blocks):
        x = Bottleneck(width, stride if b == 0 else 1, b == 0 and (stride != 1 or in_ch != 4 * width),
                       self.conv_bn, name=f"layer{s}_{b}")(x, train)
        in_ch = 4 * width
    features = [x]
    conv_bn = functools.partial(self.conv_bn, activation="relu", kernel_init=layers.xavier_init,
                                norm_kwargs=TORCH_BN)
    for k, (mid, out, kernel, stride, padding) in enumerate(EXTRAS):
      x = conv_bn(mid, 1, name=f"extra{k}_reduce")(x, train)
      x = conv_bn(out, kernel, stride, padding=padding, name=f"extra{k}_conv")(x, train)
      features.append(x)
    return features

  def _trunk_modules(self, stem_conv, stem_bn, layer):
    """{flax path: (prefix, kind)} of the ResNet50 trunk, its stem named stem_conv/stem_bn, layer s as layer(s)."""
    def conv_bn(path, conv, bn):
      return {path + ("conv",): (conv, "conv_nobias"), path + ("bn",): (bn, "bn")}
    out = conv_bn(("stem",), stem_conv, stem_bn)
    for s, (_, blocks, _) in enumerate(STAGES, start=1):
      for b in range(blocks):
        prefix = f"{layer(s)}.{b}"
        for i in (1, 2, 3):
          out.update(conv_bn((f"layer{s}_{b}", f"conv{i}"), f"{prefix}.conv{i}", f"{prefix}.bn{i}"))
        if b == 0:
          out.update(conv_bn((f"layer{s}_{b}", "downsample"), f"{prefix}.downsample.0", f"{prefix}.downsample.1"))
    return out

  def imagenet_modules(self):
    """The trunk in torchvision's resnet50() state_dict (ImageNet files such as resnet50-0676ba61.pth): conv1,
    bn1, layer1..layer4 (BN running statistics included); its fc is not used."""
    return self._trunk_modules("conv1", "bn1", lambda s: f"layer{s}")

  def torchvision_modules(self):
    """{flax module path: (state_dict prefix, kind)} in the PR's layout: `features` = Sequential(conv1, bn1, relu,
    maxpool, layer1..layer4) of torchvision's resnet50 (conv and BN under their own names), `extra.{k}` =
    Sequential(conv, BN, ReLU, conv, BN, ReLU)."""
    out = self._trunk_modules("features.0", "features.1", lambda s: f"features.{3 + s}")
    for k in range(len(EXTRAS)):
      for part, conv, bn in (("reduce", 0, 1), ("conv", 3, 4)):
        out[(f"extra{k}_{part}", "conv")] = (f"extra.{k}.{conv}", "conv_nobias")
        out[(f"extra{k}_{part}", "bn")] = (f"extra.{k}.{bn}", "bn")
    return out
