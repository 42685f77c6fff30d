"""Building blocks with torchvision's numerics, in NHWC.

Every conv uses explicit symmetric padding (k - 1) // 2 (XLA's 'SAME' differs from torch on stride 2)
and torchvision's from-scratch init N(0, 0.03^2), zero bias. BatchNorm follows torch's semantics,
including the unbiased variance in the running-statistics update. Parameters, statistics and sums are
kept in `wide_dtype(dtype)`: float32 for float32/bfloat16 compute, float64 for a float64 model.
"""

import functools
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


def wide_dtype(dtype):
  """The dtype of parameters, statistics and sums for compute dtype `dtype`: float32, or float64 for float64."""
  return jnp.promote_types(dtype, jnp.float32)


def _pad(kernel_size: int):
  p = (kernel_size - 1) // 2
  return ((p, p), (p, p))


# --- CPU fast paths -------------------------------------------------------------------------------
# XLA:CPU lowers reductions over the leading axes of an NHWC tensor (per-channel sums: BatchNorm
# statistics and their gradients, depthwise kernel gradients) to slow column reductions; a
# matrix-vector product with a vector of ones is the same sum on the GEMM path and several times
# faster. `channel_sum` is that sum; `batch_norm_train` and `depthwise_conv_shift` use it through
# custom VJPs whose backward passes are written with it (and, for the depthwise input gradient, with
# shift-and-add again).


def channel_sum(x):
  """Sum of x [..., C] over all but the last axis -> [C] in wide_dtype(x.dtype), as a ones-vector GEMV."""
  c, dtype = x.shape[-1], wide_dtype(x.dtype)
  x2 = x.reshape(-1, c).astype(dtype)
  ones = jnp.ones((x2.shape[0],), dtype)
  return lax.dot_general(ones, x2, (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                         preferred_element_type=dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, epsilon: float):
  """Training-mode BatchNorm over the last axis with batch statistics (two-pass, biased variance).

  x [..., C] (any float dtype; statistics in wide_dtype(x.dtype)), scale/bias [C] -> (y in x.dtype, mean, var).
  """
  return _batch_norm_train_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_train_fwd(x, scale, bias, epsilon):
  xf = x.astype(wide_dtype(x.dtype))
  axes = tuple(range(x.ndim - 1))
  # Statistics exactly as the generic path (jnp.mean; measured no slower than channel_sum here).
  mean = jnp.mean(xf, axis=axes)
  d = xf - mean
  var = jnp.mean(jnp.square(d), axis=axes)
  inv = lax.rsqrt(var + epsilon)
  y = (d * (inv * scale) + bias).astype(x.dtype)
  return (y, mean, var), (x, mean, inv, scale)


def _batch_norm_train_bwd(epsilon, res, cotangents):
  x, mean, inv, scale = res
  gy = cotangents[0].astype(wide_dtype(x.dtype))
  # The statistics outputs only feed the running averages (no gradient flows through them).
  n = gy.size // gy.shape[-1]
  xhat = (x.astype(gy.dtype) - mean) * inv
  dbias = channel_sum(gy)
  dscale = channel_sum(gy * xhat)
  dx = (scale * inv) * (gy - dbias / n - xhat * (dscale / n))
  return dx.astype(x.dtype), dscale, dbias


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def _fast_cpu_path() -> bool:
  return jax.default_backend() == "cpu"


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
    if self.axis_name is None and _fast_cpu_path():
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


def _tap_reader(xp, stride: int, out_h: int, out_w: int):
  """read(i, j) -> the strided window xp[:, i::stride, j::stride][:, :out_h, :out_w] for traced i, j.

  For stride > 1 the padded input is first split into its stride x stride phases, so that every window
  is a plain dynamic_slice of one phase (windows are then read inside a fori_loop, see below).
  """
  b, h, w, c = xp.shape
  if stride == 1:
    return lambda i, j: lax.dynamic_slice(xp, (0, i, j, 0), (b, out_h, out_w, c))
  hh, ww = -(-h // stride) * stride, -(-w // stride) * stride
  xp = jnp.pad(xp, ((0, 0), (0, hh - h), (0, ww - w), (0, 0)))
  phases = xp.reshape(b, hh // stride, stride, ww // stride, stride, c).transpose(2, 4, 0, 1, 3, 5)

  def read(i, j):
    window = lax.dynamic_slice(phases, (i % stride, j % stride, 0, i // stride, j // stride, 0),
                               (1, 1, b, out_h, out_w, c))
    return window.reshape(b, out_h, out_w, c)
  return read


def _depthwise_shift_fwd_impl(x, kernel, stride: int, padding):
  """Unrolled sum over the taps (XLA fuses it into one loop), in the order of the original layer."""
  k_h, k_w = kernel.shape[:2]
  xp = jnp.pad(x, ((0, 0),) + tuple(padding) + ((0, 0),))
  b, h, w, c = xp.shape
  out_h = (h - k_h) // stride + 1
  out_w = (w - k_w) // stride + 1
  read = lambda i, j: lax.slice(xp, (0, i, j, 0),
                                (b, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c),
                                (1, stride, stride, 1))
  out = None
  for i in range(k_h):
    for j in range(k_w):
      term = read(i, j) * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv_shift(x, kernel, stride: int, padding):
  """Depthwise conv as a sum over the k x k taps of strided windows (fast on XLA CPU).

  x [B, H, W, C], kernel [k, k, 1, C] -> [B, Ho, Wo, C]; same numerics as the grouped conv.
  The backward pass is shift-and-add as well: the input gradient is the full correlation of the
  (stride-dilated) output gradient with the flipped kernel, the kernel gradient the per-tap channel
  sums of input window x output gradient (as GEMVs, see channel_sum).
  """
  return _depthwise_shift_fwd_impl(x, kernel, stride, padding)


def _depthwise_shift_fwd(x, kernel, stride, padding):
  return _depthwise_shift_fwd_impl(x, kernel, stride, padding), (x, kernel)


def _depthwise_shift_bwd(stride, padding, res, g):
  x, kernel = res
  (p_t, _), (p_l, _) = padding
  k_h, k_w = kernel.shape[:2]
  _, h, w, c = x.shape
  _, out_h, out_w, _ = g.shape
  if stride == 1:
    zero = jnp.zeros((), g.dtype)
    g_padded = lax.pad(g, zero, ((0, 0, 0), (k_h - 1 - p_t, h + p_t - out_h, 0),
                                 (k_w - 1 - p_l, w + p_l - out_w, 0), (0, 0, 0)))
    dx = _depthwise_shift_fwd_impl(g_padded, kernel[::-1, ::-1].astype(g.dtype), 1, ((0, 0), (0, 0)))
  else:
    # Strided: the transpose of the strided windows (interior-padded adds) beats a correlation over
    # the stride-dilated gradient, which multiplies (stride^2 - 1) / stride^2 zeros.
    dx = jax.vjp(lambda x_: _depthwise_shift_fwd_impl(x_, kernel.astype(x.dtype), stride, padding), x)[1](g)[0]
  read = _tap_reader(jnp.pad(x, ((0, 0),) + tuple(padding) + ((0, 0),)), stride, out_h, out_w)
  gf = g.astype(wide_dtype(g.dtype))

  def body(t, dk):
    return dk.at[t].set(channel_sum(read(t // k_w, t % k_w).astype(gf.dtype) * gf))
  # The kernel-gradient taps run in a fori_loop: unrolled, XLA:CPU schedules the k*k window x gradient
  # reductions badly (3-4x slower for a 5x5 layer than the same work in a loop).
  # The initial carry is built from tap 0 so that it carries the inputs' shard_map axis types.
  dk = lax.fori_loop(1, k_h * k_w, body, body(0, jnp.zeros((k_h * k_w, c), gf.dtype)))
  return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


depthwise_conv_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


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
    kernel = self.param("kernel", conv_init, (self.kernel_size, self.kernel_size, 1, c), wide_dtype(self.dtype))
    fn = depthwise_conv_shift if resolve_depthwise_impl(self.impl) == "shift" else depthwise_conv_xla
    return fn(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, _pad(self.kernel_size))


class PointwiseConv(nn.Module):
  """1x1 conv as a matmul over the channel axis: [..., Cin] -> [..., features]; kernel [1, 1, Cin, features]
  (and bias) exactly as nn.Conv stores and initialises them. On XLA:CPU a 1x1 convolution's kernel gradient
  is up to 10x slower than the same matmul (bench/NOTES.md)."""
  features: int
  use_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", conv_init, (1, 1, x.shape[-1], self.features), wide_dtype(self.dtype))
    y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(self.dtype), kernel[0, 0].astype(self.dtype))
    y = y.reshape(x.shape[:-1] + (self.features,))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), wide_dtype(self.dtype)).astype(self.dtype)
    return y


def conv(features: int, kernel_size: int = 1, stride: int = 1, use_bias: bool = False,
         dtype: Any = jnp.float32, name: Optional[str] = None) -> nn.Module:
  """A dense conv with torch padding and init (1x1 stride 1: PointwiseConv)."""
  if kernel_size == 1 and stride == 1:
    return PointwiseConv(features, use_bias, dtype, name=name)
  return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                 padding=_pad(kernel_size), use_bias=use_bias, kernel_init=conv_init,
                 bias_init=nn.initializers.zeros, dtype=dtype, param_dtype=wide_dtype(dtype), name=name)


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
