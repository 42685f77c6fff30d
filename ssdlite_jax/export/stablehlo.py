"""StableHLO export: the detector's detect function with the weights as constants, through `jax.export`.

The file runs wherever a compatible jaxlib does, with no ssdlite_jax or flax installed:

    exported = jax.export.deserialize(bytearray(open("model.jaxexport", "rb").read()))
    dets = exported.call(images, orig_sizes)      # SSD
    dets = exported.call(images)                  # Faster R-CNN: uint8 [b, h, w, 3] of the export's input size

SSD: images float32 [b, S, S, 3] RGB in [0, 1], already resized to the model size S (bilinear, half-pixel centres,
no antialias, as the Predictor and the input pipelines), b any batch size; orig_sizes int32 [b, 2] (h, w) of
the images before the resize. Faster R-CNN: the transform is in the file, for one input size. dets: {"boxes": [b,
D, 4] xyxy original pixels, "scores": [b, D], "labels": [b, D] int32, "valid": [b, D] bool}, D =
detections_per_img, sorted by score, valid first.
"""

from typing import Any, Dict, Optional, Sequence, Tuple

import jax

from ssdlite_jax.detector import Detector

PLATFORMS = ("cpu", "cuda")
KERNELS = "per_platform"   # the CPU kernels when run on CPU, XLA's ops on CUDA


def export(detector: Detector, variables: Dict[str, Any], platforms: Sequence[str] = PLATFORMS,
           input_size: Optional[Tuple[int, int]] = None) -> Tuple[bytes, Dict[str, Any]]:
  """(serialized jax.export.Exported, metadata extras) of the detector's serving function (Detector.serving)."""
  fn, args, inputs = detector.serving(jax.device_get(variables), input_size)
  exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(*args)
  extras = {
      "platforms": list(exported.platforms),
      "jax_version": jax.__version__,
      "inputs": inputs,
      "outputs": {"boxes": "[b, D, 4] float32 xyxy original pixels", "scores": "[b, D] float32",
                  "labels": "[b, D] int32", "valid": "[b, D] bool"},
  }
  return exported.serialize(), extras
