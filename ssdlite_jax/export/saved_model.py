"""TensorFlow SavedModel export (TF Serving): the TFLite path's graph, saved before conversion.

  signature serving_default: images [1, S, S, 3] float32 RGB in [0, 1] at the model size
    -> boxes [1, D, 4] (ymin, xmin, ymax, xmax) fractions, classes [1, D] float32 (label - 1), scores [1, D],
       num [1] float32 (valid detections first)

The same network (jax2tf) and selection as tflite.py (per-class NonMaxSuppressionV5, given the float32 threshold at
which TensorFlow's kernel, which suppresses at IoU > it, decides as torchvision's), batch 1. Needs TensorFlow
to write and to run (`tf.saved_model.load(path).signatures["serving_default"](images=...)`, or TF Serving with
the directory as a model version).
"""

from typing import Any, Callable, Dict, Tuple

from ssdlite_jax.export import tflite
from ssdlite_jax.detector import Detector

KERNELS = tflite.KERNELS


def export(detector: Detector, variables: Dict[str, Any]) -> Tuple[Callable[[str], None], Dict[str, Any]]:
  """(a function that writes the SavedModel into an empty directory, metadata extras)."""
  import tensorflow as tf

  detect, extras = tflite.detect_function(detector, variables, inclusive_nms=False)

  @tf.function(input_signature=detect.input_signature, autograph=False)
  def serve(images):
    return dict(zip(tflite.OUTPUTS, detect(images)))

  def write(directory: str) -> None:
    module = tf.Module()
    module.serve = serve
    tf.saved_model.save(module, directory, signatures={"serving_default": serve.get_concrete_function()})
  return write, {**extras, "signature": "serving_default"}
