"""Every depthwise convolution of SSDlite320 (backbone, extra blocks, heads), on both implementations (kernels
'cpu': the shift-and-add with its hand-written backward; 'xla': the grouped convolution), against torch's float64
conv2d(groups=C) and its autograd: output, input gradient and kernel gradient in float32."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssdlite_jax.kernels.depthwise import depthwise_conv
from ssdlite_jax.zoo import build_model
from ssdlite_jax.ssd.configs import ssdlite320_config
from ssdlite_jax.models import layers
from tests.helpers import import_or_skip


def _ssdlite320_depthwise_shapes():
  """Unique (input size, channels, kernel, stride) of the model's depthwise convs for a 320x320 image, as
  traced through build_model (backbone, extra blocks and heads)."""
  det = build_model(ssdlite320_config())
  shapes = set()

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.DepthwiseConv) and context.method_name == "__call__":
      _, size, _, channels = args[0].shape
      shapes.add((size, channels, context.module.kernel_size, context.module.stride))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: det.module.init(jax.random.key(0), jnp.zeros((1, 320, 320, 3)), train=False))
  return sorted(shapes, reverse=True)


SHAPES = _ssdlite320_depthwise_shapes()


def _rel_err(got, want):
  return np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _value_and_grads(impl, stride, pad, x, k, g):
  """One program per shape (run eagerly, the shift-and-add's many small ops each compile on their own)."""
  y, vjp = jax.vjp(lambda a, b: impl(a, b, stride, pad), x, k)
  return (y, *vjp(g))


@pytest.mark.parametrize("size,channels,kernel,stride", SHAPES,
                         ids=[f"{s}x{s}x{c}_k{k}s{st}" for s, c, k, st in SHAPES])
@pytest.mark.torch
def test_depthwise_matches_torch_float64(size, channels, kernel, stride):
  torch = import_or_skip("torch")
  rng = np.random.default_rng(size * 1000 + channels)
  # Post-activation-like input (positive mean) and a per-channel zero-mean output gradient (what a following
  # train-mode BatchNorm passes back): the kernel gradient is then a heavily cancelling sum, the hard case.
  x = np.abs(rng.normal(0.5, 1.0, (2, size, size, channels))).astype(np.float32)
  k = (rng.standard_normal((kernel, kernel, 1, channels)) * 0.2).astype(np.float32)
  pad = layers._pad(kernel)
  out_size = (size + 2 * pad[0][0] - kernel) // stride + 1
  g = rng.standard_normal((2, out_size, out_size, channels))
  g = (g - g.mean(axis=(0, 1, 2))).astype(np.float32)

  xt = torch.tensor(x, dtype=torch.float64).permute(0, 3, 1, 2).requires_grad_()
  kt = torch.tensor(k, dtype=torch.float64).permute(3, 2, 0, 1).requires_grad_()
  yt = torch.nn.functional.conv2d(xt, kt, stride=stride, padding=pad[0][0], groups=channels)
  yt.backward(torch.tensor(g, dtype=torch.float64).permute(0, 3, 1, 2))
  want = (yt.detach().permute(0, 2, 3, 1).numpy(), xt.grad.permute(0, 2, 3, 1).numpy(),
          kt.grad.permute(2, 3, 1, 0).numpy())

  for impl in (depthwise_conv, layers.depthwise_conv_xla):
    y, dx, dk = _value_and_grads(impl, stride, pad, x, k, g)
    errs = [_rel_err(a, b) for a, b in zip((y, dx, dk), want)]
    # float32 against float64, measured worst over these shapes: 2.7e-7 for the 9-25-term output and input
    # gradient sums; the kernel gradient sums 2 x H x W products: 6.2e-6 ('cpu'), 5.2e-6 ('xla').
    assert errs[0] < 1e-6 and errs[1] < 1e-6 and errs[2] < 2e-5, (impl.__name__, errs)
