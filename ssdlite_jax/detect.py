"""The detect functions shared by the Predictor, evaluation and export: the detector's `detect` (on model inputs)
and `detect_canvas` (on uint8 images, the detector's transform included), jitted once per detector value."""

import functools
from typing import Callable

import jax
import numpy as np

from ssdlite_jax.detector import Detector


def detect(variables, images, orig_sizes, *, detector: Detector):
  """The model input (Detector.transform's), orig_sizes int32 [B, 2] (h, w) -> padded detections {boxes [B, D, 4]
  xyxy original px, scores [B, D], labels [B, D], valid [B, D]} (Detector.detect)."""
  return detector.detect(variables, images, orig_sizes)


_jit_detect = jax.jit(detect, static_argnames="detector")


def make_detect_fn(detector: Detector) -> Callable:
  """`detect` jitted for this detector: fn(variables, images, orig_sizes) -> padded detections. Equal detectors
  share the compiled programs (one jit keyed on the detector's value)."""
  return functools.partial(_jit_detect, detector=detector)


CANVAS_MULTIPLE = 128   # uint8 canvases round up to this: one compiled program per canvas size


def to_canvas(images, multiple: int = CANVAS_MULTIPLE) -> np.ndarray:
  """uint8 [B, Hc, Wc, 3] holding the H x W x 3 uint8 `images` top-left, sides rounded up to `multiple`."""
  up = lambda x: -(-x // multiple) * multiple
  canvas = np.zeros((len(images), up(max(im.shape[0] for im in images)), up(max(im.shape[1] for im in images)), 3),
                    np.uint8)
  for i, im in enumerate(images):
    canvas[i, :im.shape[0], :im.shape[1]] = im
  return canvas


@functools.partial(jax.jit, static_argnames="detector")
def detect_canvas(variables, canvas, plan, orig_sizes, *, detector: Detector):
  """uint8 canvas [B, Hc, Wc, 3] (images top-left aligned) and the detector's input plan (Detector.prepare of the
  images' sizes) -> padded detections; one jit keyed on the detector's value, so Predictors and evaluations of equal
  detectors share the compiled programs."""
  return detect(variables, detector.transform(canvas, plan), orig_sizes, detector=detector)


def eval_batch_size(detector: Detector, requested: int) -> int:
  """The global eval batch: `requested` where the pipeline resizes to detector.input_size, else one image per
  process (make_eval_fn)."""
  return requested if detector.input_size is not None else jax.process_count()


def make_eval_fn(detector: Detector) -> Callable:
  """fn(variables, images, orig_sizes) -> padded detections over the eval pipeline's batches: images resized to
  detector.input_size by the pipeline, or, for a detector without one, uint8 images as decoded (batch of 1 per
  process) that its own transform resizes."""
  if detector.input_size is not None:
    return make_detect_fn(detector)

  def fn(variables, images, orig_sizes):
    sizes = [tuple(int(v) for v in s) for s in np.asarray(orig_sizes)]
    sizes = [s if min(s) > 0 else images.shape[1:3] for s in sizes]   # the pipeline's padding example
    return detect_canvas(variables, to_canvas(list(images)), detector.prepare(sizes), orig_sizes, detector=detector)
  return fn
