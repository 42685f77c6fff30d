"""Depthwise convolution as shift-and-add over the k x k taps, with a shift-and-add backward pass."""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ssdlite_jax.dtypes import wide_dtype
from ssdlite_jax.kernels.sums import channel_sum


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
def depthwise_conv(x, kernel, stride: int, padding):
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


depthwise_conv.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)
