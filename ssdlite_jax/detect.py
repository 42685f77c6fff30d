"""The detect function shared by the Predictor, evaluation and export: the detector's `detect`, jitted once per
detector value."""

import functools
from typing import Callable

import jax

from ssdlite_jax.detector import Detector


def detect(variables, images, orig_sizes, *, detector: Detector):
  """Model input [B, H, W, 3] in [0, 1], orig_sizes int32 [B, 2] (h, w) -> padded detections {boxes [B, D, 4]
  xyxy original px, scores [B, D], labels [B, D], valid [B, D]} (Detector.detect)."""
  return detector.detect(variables, images, orig_sizes)


_jit_detect = jax.jit(detect, static_argnames="detector")


def make_detect_fn(detector: Detector) -> Callable:
  """`detect` jitted for this detector: fn(variables, images, orig_sizes) -> padded detections. Equal detectors
  share the compiled programs (one jit keyed on the detector's value)."""
  return functools.partial(_jit_detect, detector=detector)
