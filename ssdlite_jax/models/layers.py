"""Building blocks with torchvision's numerics, in NHWC.

Every conv uses explicit symmetric padding, (k - 1) // 2 unless given (XLA's 'SAME' differs from torch on
stride 2), and torchvision's SSDlite from-scratch init N(0, 0.03^2) unless given (SSD's VGG uses kaiming_fan_out
and xavier_init), zero bias. BatchNorm follows torch's semantics,
including the unbiased variance in the running-statistics update. Parameters, statistics and sums are
kept in `wide_dtype(dtype)`: float32 for float32/bfloat16 compute, float64 for a float64 model.

`kernels` ('cpu', 'xla' or 'per_platform', resolved by build_model, see ssdlite_jax.kernels) picks the
implementation; the parameters are the same either way. Models take these layers as partials with the options
already bound (`layer_factories`), as Flax's ResNet takes `conv` and `norm`.
"""

import functools
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ssdlite_jax.dtypes import wide_dtype
from ssdlite_jax.kernels.batch_norm import batch_norm_train
from ssdlite_jax.kernels.depthwise import depthwise_conv
from ssdlite_jax.kernels.pointwise import pointwise_conv

conv_init = nn.initializers.normal(stddev=0.03)
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torch kaiming_normal_(fan_out)
xavier_init = nn.initializers.xavier_uniform()                                 # torch xavier_uniform_

ACTIVATIONS = {
    "relu": nn.relu,
    "relu6": nn.relu6,
    "hardswish": jax.nn.hard_swish,
    "none": None,
}


def _pad(kernel_size: int, padding: Optional[int] = None):
  p = (kernel_size - 1) // 2 if padding is None else padding
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
  kernels: str = "xla"

  @nn.compact
  def __call__(self, x, train: bool):
    c, dtype = x.shape[-1], wide_dtype(x.dtype)
    scale = self.param("scale", nn.initializers.ones, (c,), dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), dtype)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), dtype)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), dtype)
    count = self.variable("batch_stats", "num_batches_tracked", jnp.zeros, (), jnp.int32)
    if not train:
      inv = lax.rsqrt(ra_var.value + self.epsilon) * scale
      return ((x.astype(dtype) - ra_mean.value) * inv + bias).astype(x.dtype)
    n = x.size // c
    if self.axis_name is None and self.kernels == "cpu":
      y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
      mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
    else:
      xf = x.astype(dtype)
      axes = tuple(range(x.ndim - 1))
      # Two-pass statistics as torch; with axis_name both passes are averaged across devices
      # (equal per-device batches), which equals the statistics of the concatenated batch.
      mean = jnp.mean(xf, axis=axes)
      if self.axis_name is not None:
        mean = lax.pmean(mean, self.axis_name)
      var = jnp.mean(jnp.square(xf - mean), axis=axes)
      if self.axis_name is not None:
        var = lax.pmean(var, self.axis_name)
        n *= lax.axis_size(self.axis_name)
      y = ((xf - mean) * (lax.rsqrt(var + self.epsilon) * scale) + bias).astype(x.dtype)
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * mean
      ra_var.value = m * ra_var.value + (1 - m) * var * (n / max(n - 1, 1))
      count.value = count.value + 1
    return y


class FrozenBatchNorm(nn.Module):
  """torchvision's FrozenBatchNorm2d over the last axis: x * (w * rsqrt(rv + eps)) + (b - rm * w * rsqrt(rv + eps)),
  in train mode too. Its four tensors are buffers in torch (no parameters, no num_batches_tracked): here they live
  in batch_stats as scale/bias/mean/var, which no step updates and the optimizer never sees."""
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    c, dtype = x.shape[-1], wide_dtype(x.dtype)
    scale = self.variable("batch_stats", "scale", jnp.ones, (c,), dtype).value
    bias = self.variable("batch_stats", "bias", jnp.zeros, (c,), dtype).value
    mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), dtype).value
    var = self.variable("batch_stats", "var", jnp.ones, (c,), dtype).value
    mul = scale * lax.rsqrt(var + self.epsilon)
    return (x.astype(dtype) * mul + (bias - mean * mul)).astype(x.dtype)


def max_pool(x, kernel: int, stride: int, padding: int = 0, ceil_mode: bool = False):
  """torch MaxPool2d on NHWC x: -inf padding; ceil_mode pads the bottom/right so that a last, partial window
  counts (torch's rule: it must start inside the input or the left padding)."""
  pads = []
  for n in x.shape[1:3]:
    extra = 0
    if ceil_mode:
      out = -(-(n + 2 * padding - kernel) // stride) + 1
      if (out - 1) * stride >= n + padding:
        out -= 1
      extra = max(0, (out - 1) * stride + kernel - n - 2 * padding)
    pads.append((padding, padding + extra))
  # The padding as its own -inf pad, then a VALID pool by keyword: jax2onnx converts only that form of
  # nn.max_pool (explicit pads fail in its patched max_pool; lax.reduce_window becomes a 4-D MaxPool).
  if any(pads[0] + pads[1]):
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
  return nn.max_pool(x, window_shape=(kernel, kernel), strides=(stride, stride), padding="VALID")


def depthwise_conv_xla(x, kernel, stride: int, padding):
  """Depthwise conv as XLA's grouped convolution (fast on GPU/TPU)."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def pointwise_conv_xla(x, kernel):
  """1x1 conv of NHWC x as XLA's convolution, kernel [1, 1, Cin, F] -> [B, H, W, F] in x.dtype."""
  return lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1), "VALID",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _by_kernels(kernels: str, cpu, xla, *args):
  """cpu(*args) for kernels 'cpu', xla(*args) for 'xla'; 'per_platform' leaves the choice to lowering
  (lax.platform_dependent: cpu on CPU, xla elsewhere)."""
  if kernels == "per_platform":
    return lax.platform_dependent(*args, cpu=cpu, default=xla)
  return (cpu if kernels == "cpu" else xla)(*args)


class DepthwiseConv(nn.Module):
  """k x k depthwise conv, no bias; kernel [k, k, 1, C] as Flax's grouped nn.Conv stores it."""
  kernel_size: int
  stride: int = 1
  kernels: str = "xla"
  dtype: Any = jnp.float32
  kernel_init: Callable = conv_init

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (self.kernel_size, self.kernel_size, 1, c),
                        wide_dtype(self.dtype))
    stride, padding = self.stride, _pad(self.kernel_size)
    return _by_kernels(self.kernels, lambda x, k: depthwise_conv(x, k, stride, padding),
                       lambda x, k: depthwise_conv_xla(x, k, stride, padding),
                       x.astype(self.dtype), kernel.astype(self.dtype))


class PointwiseConv(nn.Module):
  """1x1 conv as a matmul over the channel axis: NHWC [..., Cin] -> [..., features]; kernel [1, 1, Cin,
  features] (and bias) exactly as nn.Conv stores and initialises them. kernels='per_platform': the matmul on
  CPU, XLA's 1x1 convolution elsewhere."""
  features: int
  use_bias: bool = False
  dtype: Any = jnp.float32
  kernels: str = "cpu"
  kernel_init: Callable = conv_init

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), wide_dtype(self.dtype))
    y = _by_kernels(self.kernels, pointwise_conv, pointwise_conv_xla, x.astype(self.dtype), kernel)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), wide_dtype(self.dtype)).astype(self.dtype)
    return y


def conv(features: int, kernel_size: int = 1, stride: int = 1, use_bias: bool = False, *, kernels: str = "xla",
         dtype: Any = jnp.float32, padding: Optional[int] = None, dilation: int = 1,
         kernel_init: Callable = conv_init, name: Optional[str] = None) -> nn.Module:
  """A dense conv with torch's symmetric `padding` (default (k - 1) // 2), kernel `dilation` and init (with
  kernels 'cpu' or 'per_platform', 1x1 stride 1 is a PointwiseConv)."""
  if kernels in ("cpu", "per_platform") and kernel_size == 1 and stride == 1 and not padding:
    return PointwiseConv(features, use_bias, dtype, kernels, kernel_init, name=name)
  return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                 padding=_pad(kernel_size, padding), kernel_dilation=(dilation, dilation), use_bias=use_bias,
                 kernel_init=kernel_init, bias_init=nn.initializers.zeros, dtype=dtype,
                 param_dtype=wide_dtype(dtype), name=name)


class ConvBNAct(nn.Module):
  """torchvision's Conv2dNormActivation: conv (no bias) -> norm -> activation.

  `depthwise=True` makes the conv depthwise (channels unchanged, `features` ignored). `conv`, `depthwise_conv`
  and `norm` are the layer factories (see layer_factories); norm=None gives conv (with bias) -> activation.
  `padding` and `kernel_init` go to the dense conv (defaults (k - 1) // 2 and conv_init); `norm_kwargs` to the
  norm (e.g. torch's BatchNorm2d defaults for ResNet: dict(momentum=0.9, epsilon=1e-5)).
  """
  features: int
  kernel_size: int = 1
  stride: int = 1
  depthwise: bool = False
  activation: str = "relu6"
  conv: Callable = conv
  depthwise_conv: Callable = DepthwiseConv
  norm: Optional[Callable] = BatchNorm
  padding: Optional[int] = None
  kernel_init: Callable = conv_init
  norm_kwargs: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    if self.depthwise:
      x = self.depthwise_conv(self.kernel_size, self.stride, kernel_init=self.kernel_init, name="conv")(x)
    else:
      x = self.conv(self.features, self.kernel_size, self.stride, use_bias=self.norm is None, padding=self.padding,
                    kernel_init=self.kernel_init, name="conv")(x)
    if self.norm is not None:
      x = self.norm(name="bn", **(self.norm_kwargs or {}))(x, train)
    act = ACTIVATIONS[self.activation]
    return x if act is None else act(x)


class LayerFactories(NamedTuple):
  """The layers a backbone or head builds, with the model-wide options bound: conv(features, kernel_size,
  stride, use_bias, name=...) and conv_bn(features, kernel_size, stride, depthwise, activation, name=...)."""
  conv: Callable
  conv_bn: Callable


def layer_factories(kernels: str, dtype: Any, bn_axis_name: Optional[str] = None) -> LayerFactories:
  """LayerFactories for resolved `kernels` ('cpu' | 'xla' | 'per_platform'), compute `dtype` and BN across
  `bn_axis_name`."""
  dense = functools.partial(conv, kernels=kernels, dtype=dtype)
  conv_bn = functools.partial(
      ConvBNAct, conv=dense, depthwise_conv=functools.partial(DepthwiseConv, kernels=kernels, dtype=dtype),
      norm=functools.partial(BatchNorm, axis_name=bn_axis_name, kernels=kernels))
  return LayerFactories(conv=dense, conv_bn=conv_bn)
