"""Building blocks with torchvision's numerics, in NHWC.

Every conv uses explicit symmetric padding (k - 1) // 2 (XLA's 'SAME' differs from torch on stride 2)
and torchvision's from-scratch init N(0, 0.03^2), zero bias. BatchNorm follows torch's semantics,
including the unbiased variance in the running-statistics update.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

conv_init = nn.initializers.normal(stddev=0.03)

ACTIVATIONS = {
    "relu": nn.relu,
    "relu6": nn.relu6,
    "hardswish": jax.nn.hard_swish,
    "none": None,
}


def _pad(kernel_size: int):
  p = (kernel_size - 1) // 2
  return ((p, p), (p, p))


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm2d over the last axis: params scale/bias, batch_stats mean/var/num_batches_tracked.

  Training normalises with the biased batch variance and updates the running variance with the
  unbiased one (x n / (n - 1)) as torch does; `momentum` is Flax's (torch 0.03 == 0.97).
  With `axis_name`, batch statistics are averaged across that mapped axis (cross-device BN).
  """
  momentum: float = 0.97
  epsilon: float = 1e-3
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    count = self.variable("batch_stats", "num_batches_tracked", jnp.zeros, (), jnp.int32)
    if train:
      xf = x.astype(jnp.float32)
      axes = tuple(range(x.ndim - 1))
      n = 1
      for a in axes:
        n *= x.shape[a]
      # Two-pass statistics as torch; with axis_name both passes are averaged across devices
      # (equal per-device batches), which equals the statistics of the concatenated batch.
      mean = jnp.mean(xf, axis=axes)
      if self.axis_name is not None:
        mean = lax.pmean(mean, self.axis_name)
      var = jnp.mean(jnp.square(xf - mean), axis=axes)
      if self.axis_name is not None:
        var = lax.pmean(var, self.axis_name)
        n *= lax.axis_size(self.axis_name)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean
        ra_var.value = m * ra_var.value + (1 - m) * var * (n / max(n - 1, 1))
        count.value = count.value + 1
    else:
      mean, var = ra_mean.value, ra_var.value
    inv = lax.rsqrt(var + self.epsilon) * scale
    y = (x.astype(jnp.float32) - mean) * inv + bias
    return y.astype(x.dtype)


def depthwise_conv_shift(x, kernel, stride: int, padding):
  """Depthwise conv as a sum over the k x k taps of strided slices (fast on XLA CPU).

  x [B, H, W, C], kernel [k, k, 1, C] -> [B, Ho, Wo, C]; same numerics as the grouped conv.
  """
  k_h, k_w = kernel.shape[:2]
  x = jnp.pad(x, ((0, 0),) + tuple(padding) + ((0, 0),))
  b, h, w, c = x.shape
  out_h = (h - k_h) // stride + 1
  out_w = (w - k_w) // stride + 1
  out = None
  for i in range(k_h):
    for j in range(k_w):
      tap = lax.slice(x, (0, i, j, 0),
                      (b, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c),
                      (1, stride, stride, 1))
      term = tap * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def depthwise_conv_xla(x, kernel, stride: int, padding):
  """Depthwise conv as XLA's grouped convolution (fast on GPU/TPU)."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def resolve_depthwise_impl(impl: str) -> str:
  """'auto' -> 'shift' on CPU, 'xla' elsewhere."""
  if impl == "auto":
    return "shift" if jax.default_backend() == "cpu" else "xla"
  if impl not in ("shift", "xla"):
    raise ValueError(f"depthwise_impl must be 'auto', 'shift' or 'xla', got {impl!r}")
  return impl


class DepthwiseConv(nn.Module):
  """k x k depthwise conv, no bias; kernel [k, k, 1, C] as Flax's grouped nn.Conv stores it."""
  kernel_size: int
  stride: int = 1
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kernel = self.param("kernel", conv_init, (self.kernel_size, self.kernel_size, 1, c), jnp.float32)
    fn = depthwise_conv_shift if resolve_depthwise_impl(self.impl) == "shift" else depthwise_conv_xla
    return fn(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, _pad(self.kernel_size))


def conv(features: int, kernel_size: int = 1, stride: int = 1, use_bias: bool = False,
         dtype: Any = jnp.float32, name: Optional[str] = None) -> nn.Conv:
  """A dense conv with torch padding and init."""
  return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                 padding=_pad(kernel_size), use_bias=use_bias, kernel_init=conv_init,
                 bias_init=nn.initializers.zeros, dtype=dtype, param_dtype=jnp.float32, name=name)


class ConvBNAct(nn.Module):
  """torchvision's Conv2dNormActivation: conv (no bias) -> BatchNorm -> activation.

  `depthwise=True` makes the conv depthwise (channels unchanged, `features` ignored).
  """
  features: int
  kernel_size: int = 1
  stride: int = 1
  depthwise: bool = False
  activation: str = "relu6"
  bn_axis_name: Optional[str] = None
  depthwise_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if self.depthwise:
      x = DepthwiseConv(self.kernel_size, self.stride, self.depthwise_impl, self.dtype, name="conv")(x)
    else:
      x = conv(self.features, self.kernel_size, self.stride, dtype=self.dtype, name="conv")(x)
    x = BatchNorm(axis_name=self.bn_axis_name, name="bn")(x, train)
    act = ACTIVATIONS[self.activation]
    return x if act is None else act(x)
