"""Hand-written CPU kernels for the layers in models/layers.py, behind one switch (`model.kernels`).

XLA:CPU lowers reductions over the leading axes of an NHWC tensor (per-channel sums: BatchNorm statistics
and their gradients, depthwise kernel gradients) to slow column reductions, a depthwise conv to a slow loop
and a 1x1 conv's kernel gradient to a slow convolution (bench/NOTES.md). These kernels compute the same
functions with custom VJPs built on matrix products:

  sums.channel_sum            per-channel sum as a ones-vector GEMV
  batch_norm.batch_norm_train training BatchNorm with a closed-form backward
  depthwise.depthwise_conv    shift-and-add over the k x k taps, forward and backward
  pointwise.pointwise_conv    1x1 conv as a matmul

`model.kernels`: 'cpu' uses them, 'xla' the plain XLA ops (grouped conv, generic BatchNorm, nn.Conv), 'auto'
(default) picks 'cpu' on the CPU backend and 'xla' elsewhere, once, in build_model. 'per_platform' decides when
the function is lowered (lax.platform_dependent: the CPU kernels for 'cpu', XLA's ops elsewhere), for exported
inference functions that run on several platforms; training BatchNorm then takes the generic path.
"""

import jax

KERNELS = ("auto", "cpu", "xla", "per_platform")


def resolve(kernels: str) -> str:
  """'auto' -> 'cpu' on the CPU backend, 'xla' elsewhere; the others as given."""
  if kernels not in KERNELS:
    raise ValueError(f"model.kernels={kernels!r}; known: {KERNELS}")
  if kernels == "auto":
    return "cpu" if jax.default_backend() == "cpu" else "xla"
  return kernels
