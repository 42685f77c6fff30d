"""StableHLO export: detect.detect with the weights as constants, through `jax.export`.

The file runs wherever a compatible jaxlib does, with no ssdlite_jax or flax installed:

    exported = jax.export.deserialize(bytearray(open("model.jaxexport", "rb").read()))
    dets = exported.call(images, orig_sizes)

images float32 [b, S, S, 3] RGB in [0, 1], already resized to the model size S (bilinear, half-pixel centres,
no antialias, as the Predictor and the input pipelines), b any batch size; orig_sizes int32 [b, 2] (h, w) of
the images before the resize. dets: {"boxes": [b, D, 4] xyxy original pixels, "scores": [b, D], "labels":
[b, D] int32, "valid": [b, D] bool}, D = detections_per_img, sorted by score, valid first.
"""

import functools
from typing import Any, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp

from ssdlite_jax import detect
from ssdlite_jax.detector import Detector

PLATFORMS = ("cpu", "cuda")
KERNELS = "per_platform"   # the CPU kernels when run on CPU, XLA's ops on CUDA


def export(detector: Detector, variables: Dict[str, Any], platforms: Sequence[str] = PLATFORMS
           ) -> Tuple[bytes, Dict[str, Any]]:
  """(serialized jax.export.Exported, metadata extras) of the detector's detect function."""
  variables = jax.device_get(variables)
  fn = jax.jit(functools.partial(detect.detect, variables, detector=detector))
  batch, = jax.export.symbolic_shape("b")
  size = detector.image_size
  exported = jax.export.export(fn, platforms=tuple(platforms))(
      jax.ShapeDtypeStruct((batch,) + size + (3,), jnp.float32), jax.ShapeDtypeStruct((batch, 2), jnp.int32))
  extras = {
      "platforms": list(exported.platforms),
      "jax_version": jax.__version__,
      "inputs": {"images": ["b", *size, 3, "float32 RGB in [0, 1], resized to the model size"],
                 "orig_sizes": ["b", 2, "int32 (h, w) before the resize"]},
      "outputs": {"boxes": "[b, D, 4] float32 xyxy original pixels", "scores": "[b, D] float32",
                  "labels": "[b, D] int32", "valid": "[b, D] bool"},
  }
  return exported.serialize(), extras
