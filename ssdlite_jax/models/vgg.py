"""VGG16 feature extractor for SSD300 / SSD512, as torchvision's _vgg_extractor builds it from vgg16().

conv1_1..conv4_3 (pool3 in ceil mode: 75 -> 38 at 300 px) -> tap 0: conv4_3 L2-normalised over channels and
scaled per channel (learnt, init 20); pool4, conv5_x, pool5 3x3/1/1, atrous fc6 (dilation 6), fc7 -> tap 1;
then 4 extra blocks (1x1 reduce, 3x3 conv), 5 with `highres` (SSD512: a last 4x4 conv) -> 6 or 7 NHWC maps.
No BatchNorm: every conv has a bias and a ReLU. Init as torchvision without ImageNet weights: the 13 VGG convs
kaiming-normal (fan_out), fc6/fc7 and the extras xavier-uniform.
"""

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from ssdlite_jax.dtypes import wide_dtype
from ssdlite_jax.models import layers

STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))  # VGG16 ("D") conv widths
# Extra blocks conv8..conv12: (1x1 reduce channels, out channels, kernel, stride, padding) of the second conv.
EXTRAS = ((256, 512, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 3, 1, 0), (128, 256, 3, 1, 0))
HIGHRES_EXTRA = (128, 256, 4, 1, 0)


class L2Norm(nn.Module):
  """F.normalize(x) * scale_weight over the channel axis: x / max(||x||_2, 1e-12) * scale (per channel, init
  20); at an all-zero pixel 0 with torch's gradient scale / 1e-12, not NaN."""

  @nn.compact
  def __call__(self, x):
    dtype = wide_dtype(x.dtype)
    scale = self.param("scale_weight", nn.initializers.constant(20.0), (x.shape[-1],), dtype)
    xf = x.astype(dtype)
    norm = jnp.sqrt(jnp.maximum(jnp.sum(xf * xf, axis=-1, keepdims=True), 1e-24))  # = max(||x||, 1e-12)
    return (xf / norm * scale).astype(x.dtype)


class VGG16SSD(nn.Module):
  """images normalised as torchvision's SSD300 ([0, 255] RGB minus the mean) [B, H, W, 3] -> 6 NHWC maps
  (7 with highres): at 300 px 512x38², 1024x19², 512x10², 256x5², 256x3², 256x1²."""
  highres: bool = False
  conv: Callable = layers.conv

  @nn.compact
  def __call__(self, x, train: bool):
    def conv_relu(x, features, kernel_size, name, stride=1, padding=None, dilation=1, init=layers.xavier_init):
      return nn.relu(self.conv(features, kernel_size, stride, use_bias=True, padding=padding, dilation=dilation,
                               kernel_init=init, name=name)(x))

    features = []
    for s, widths in enumerate(STAGES, start=1):
      if s == 5:
        features.append(L2Norm(name="conv4_3_norm")(x))
      if s > 1:
        x = layers.max_pool(x, 2, 2, ceil_mode=s == 4)
      for i, width in enumerate(widths, start=1):
        x = conv_relu(x, width, 3, f"conv{s}_{i}", init=layers.kaiming_fan_out)
    x = layers.max_pool(x, 3, 1, padding=1)
    x = conv_relu(x, 1024, 3, "fc6", padding=6, dilation=6)
    x = conv_relu(x, 1024, 1, "fc7")
    features.append(x)
    for k, (mid, out, kernel, stride, padding) in enumerate(self._extras(), start=8):
      x = conv_relu(x, mid, 1, f"conv{k}_1")
      x = conv_relu(x, out, kernel, f"conv{k}_2", stride=stride, padding=padding)
      features.append(x)
    return features

  def _extras(self):
    return EXTRAS + ((HIGHRES_EXTRA,) if self.highres else ())

  def imagenet_modules(self):
    """{flax module path: (prefix, kind)} in torchvision's vgg16().features (ImageNet backbone files): the 13
    convs, skipping ReLU and pool slots; fc6/fc7 and the extras are not pretrained."""
    out, index = {}, 0
    for s, widths in enumerate(STAGES, start=1):
      index += s > 1
      for i in range(1, len(widths) + 1):
        out[(f"conv{s}_{i}",)] = (f"features.{index}", "conv")
        index += 2
    return out

  def torchvision_modules(self):
    """{flax module path: (torchvision state_dict prefix, kind)}: conv1_1..conv4_3 are vgg16 `features.{i}`,
    conv5_x `extra.0.{i - 23}` (pool4 is extra.0.0), fc6/fc7 `extra.0.7.{1,3}` (after pool5), extra block k
    `extra.{k}.{0,2}`; the L2Norm scale is the bare `scale_weight`."""
    out = {("conv4_3_norm", "scale_weight"): ("scale_weight", "tensor")}
    for path, (prefix, kind) in self.imagenet_modules().items():
      index = int(prefix.split(".")[1])
      out[path] = (prefix if index < 23 else f"extra.0.{index - 23}", kind)
    out[("fc6",)] = ("extra.0.7.1", "conv")
    out[("fc7",)] = ("extra.0.7.3", "conv")
    for k in range(len(self._extras())):
      out[(f"conv{k + 8}_1",)] = (f"extra.{k + 1}.0", "conv")
      out[(f"conv{k + 8}_2",)] = (f"extra.{k + 1}.2", "conv")
    return out
