"""torchvision's FeaturePyramidNetwork with LastLevelMaxPool (no norm, no activation), on NHWC maps."""

from typing import Callable, Dict, List

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ssdlite_jax.models import layers

# torch's kaiming_uniform_(a=1): U(+-sqrt(3 / fan_in)), the FPN's conv init (bias 0).
kaiming_uniform_a1 = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def nearest_resize(x, size):
  """torch's F.interpolate(mode='nearest', size=size) of NHWC x: source index floor(dst * in / out) (float32). The
  MobileNetV3 FPN's two taps have the same size, so there it is the identity."""
  for axis, out in zip((1, 2), size):
    n = x.shape[axis]
    if n != out:
      src = np.floor(np.arange(out, dtype=np.float32) * (np.float32(n) / np.float32(out)))
      idx = np.minimum(src.astype(np.int32), n - 1)
      x = jnp.take(x, idx, axis=axis)
  return x


class FPN(nn.Module):
  """features [B, H_l, W_l, C_l] (finest first) -> the pyramid [B, H_l, W_l, out_channels] per level plus
  LastLevelMaxPool's 'pool' level (the last map at stride 2: max_pool2d(kernel 1, stride 2))."""
  out_channels: int = 256
  conv: Callable = layers.conv

  @nn.compact
  def __call__(self, features) -> List:
    conv = lambda k, name: self.conv(self.out_channels, k, use_bias=True, kernel_init=kaiming_uniform_a1, name=name)
    last = len(features) - 1
    inner = conv(1, f"inner{last}")(features[last])
    results = [conv(3, f"layer{last}")(inner)]
    for i in range(last - 1, -1, -1):
      lateral = conv(1, f"inner{i}")(features[i])
      inner = lateral + nearest_resize(inner, lateral.shape[1:3])
      results.insert(0, conv(3, f"layer{i}")(inner))
    return results + [results[-1][:, ::2, ::2]]

  def torchvision_modules(self, prefix: str, num_levels: int) -> Dict[tuple, tuple]:
    """{flax module path: (torch prefix, kind)}, in torchvision's state_dict order."""
    out = {(f"inner{i}",): (f"{prefix}.inner_blocks.{i}.0", "conv") for i in range(num_levels)}
    out.update({(f"layer{i}",): (f"{prefix}.layer_blocks.{i}.0", "conv") for i in range(num_levels)})
    return out
