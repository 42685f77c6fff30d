"""Predictor: uint8 RGB images of any size -> detections in original pixels, like torchvision's
`model.eval()(images)`.

    from ssdlite_jax.inference import Predictor
    predictor = Predictor.from_torch("ssdlite320.pth")   # or Predictor.from_checkpoint(dir)
    dets = predictor([image])  # [{"boxes": [n, 4] xyxy px, "scores": [n], "labels": [n]}]
"""

import functools
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np

from ssdlite_jax import detect
from ssdlite_jax.detector import Detector
from ssdlite_jax.loading import load_detector


def to_rgb_uint8(image, name: str = "image") -> np.ndarray:
  """H x W x 3 uint8 from an RGB, grayscale (H x W or H x W x 1) or RGBA (alpha dropped) uint8 array."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"{name}: expected a uint8 array (0..255), got dtype {image.dtype}; convert it "
                     f"explicitly, e.g. (x * 255).round().astype(np.uint8) for floats in [0, 1]")
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
    raise ValueError(f"{name}: expected H x W x 3 (RGB), H x W x 4 (RGBA) or H x W (grayscale), "
                     f"got shape {image.shape}")
  if image.shape[0] < 1 or image.shape[1] < 1:
    raise ValueError(f"{name}: empty image of shape {image.shape}")
  if image.shape[2] == 1:
    image = np.repeat(image, 3, axis=2)
  return np.ascontiguousarray(image[:, :, :3])


class Predictor:
  """Batched, jit-compiled inference. Images are padded to a canvas whose sides are multiples of
  `canvas_multiple`, so each distinct canvas size compiles once (once per process for equal detectors)."""

  def __init__(self, detector: Detector, variables, batch_size: int = 8,
               canvas_multiple: int = detect.CANVAS_MULTIPLE):
    self.detector = detector
    self.variables = jax.device_put(variables)
    self.batch_size = batch_size
    self.canvas_multiple = canvas_multiple
    self._detect = functools.partial(detect.detect_canvas, detector=detector)

  @classmethod
  def from_torch(cls, path: str, model_config=None, **kwargs) -> "Predictor":
    """From a torchvision state_dict (.pth or .safetensors); variant and class count are read from it unless
    `model_config` is given (see loading.load_detector)."""
    return cls(*load_detector(path, model_config)[:2], **kwargs)

  @classmethod
  def from_checkpoint(cls, ckpt_dir: str, step: Optional[int] = None, **kwargs) -> "Predictor":
    """From an orbax checkpoint directory written by train.py or port_weights.py (step: default the latest)."""
    return cls(*load_detector(ckpt_dir, step=step)[:2], **kwargs)

  @property
  def class_names(self) -> Sequence[str]:
    """Names indexed by label (Detector.class_names)."""
    return self.detector.class_names

  def __call__(self, images: Sequence[np.ndarray]) -> List[Dict[str, np.ndarray]]:
    images = [to_rgb_uint8(im, f"images[{i}]") for i, im in enumerate(images)]
    results = []
    for start in range(0, len(images), self.batch_size):
      results.extend(self._predict_batch(images[start:start + self.batch_size]))
    return results

  def _predict_batch(self, images):
    sizes = [im.shape[:2] for im in images]
    canvas = detect.to_canvas(images, self.canvas_multiple)
    out = jax.device_get(self._detect(self.variables, canvas, self.detector.prepare(sizes),
                                      np.asarray(sizes, np.int32)))
    results = []
    for i in range(len(images)):
      n = int(out["valid"][i].sum())
      results.append({"boxes": out["boxes"][i, :n], "scores": out["scores"][i, :n],
                      "labels": out["labels"][i, :n].astype(np.int64)})
    return results

