"""Predictor: uint8 RGB images of any size -> detections in original pixels, like torchvision's
`model.eval()(images)`.

    from ssdlite_jax.inference import Predictor
    predictor = Predictor.from_torch("ssdlite320.pth", num_classes=91)   # or Predictor.from_checkpoint(dir)
    dets = predictor([image])  # [{"boxes": [n, 4] xyxy px, "scores": [n], "labels": [n]}]
"""

import functools
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ssdlite_jax import checkpoint, porting, postprocess, preprocess
from ssdlite_jax.data import coco_labels
from ssdlite_jax.models import Detector, build_model, default_model_config


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


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


class Predictor:
  """Batched, jit-compiled inference. Images are padded to a canvas whose sides are multiples of
  `canvas_multiple`, so each distinct canvas size compiles once."""

  def __init__(self, detector: Detector, variables, batch_size: int = 8, canvas_multiple: int = 128):
    self.detector = detector
    self.variables = jax.device_put(variables)
    self.batch_size = batch_size
    self.canvas_multiple = canvas_multiple
    self._detect = jax.jit(functools.partial(_detect, detector=detector, **postprocess_kwargs(detector)))

  @classmethod
  def from_torch(cls, path: str, num_classes: int = 91, model_config=None, **kwargs) -> "Predictor":
    """From a torchvision ssdlite320_mobilenet_v3_large state_dict (.pth or .safetensors)."""
    cfg = model_config or default_model_config()
    cfg.num_classes = num_classes
    detector = build_model(cfg)
    return cls(detector, porting.load_torchvision_weights(path, detector), **kwargs)

  @classmethod
  def from_checkpoint(cls, ckpt_dir: str, step: Optional[int] = None, **kwargs) -> "Predictor":
    """From an orbax checkpoint directory written by train.py or port_weights.py."""
    variables, cfg, _ = checkpoint.load_variables(ckpt_dir, step)
    return cls(build_model(cfg), variables, **kwargs)

  @property
  def class_names(self) -> Sequence[str]:
    """Names indexed by label: the checkpoint's, else COCO's for 91-class weights, else the label numbers."""
    cfg = self.detector.config
    if cfg.class_names:
      return tuple(cfg.class_names)
    if cfg.num_classes == coco_labels.NUM_CLASSES:
      return tuple(coco_labels.coco_class_names())
    return tuple(str(i) for i in range(cfg.num_classes))

  def __call__(self, images: Sequence[np.ndarray]) -> List[Dict[str, np.ndarray]]:
    images = [to_rgb_uint8(im, f"images[{i}]") for i, im in enumerate(images)]
    results = []
    for start in range(0, len(images), self.batch_size):
      results.extend(self._predict_batch(images[start:start + self.batch_size]))
    return results

  def _predict_batch(self, images):
    sizes = [im.shape[:2] for im in images]
    canvas_h = _round_up(max(h for h, _ in sizes), self.canvas_multiple)
    canvas_w = _round_up(max(w for _, w in sizes), self.canvas_multiple)
    canvas = np.zeros((len(images), canvas_h, canvas_w, 3), np.uint8)
    for i, im in enumerate(images):
      canvas[i, :im.shape[0], :im.shape[1]] = im
    taps_y, taps_x = preprocess.batch_taps(sizes, self.detector.image_size)
    out = jax.device_get(self._detect(self.variables, canvas, taps_y, taps_x,
                                      np.asarray(sizes, np.int32)))
    results = []
    for i in range(len(images)):
      n = int(out["valid"][i].sum())
      results.append({"boxes": out["boxes"][i, :n], "scores": out["scores"][i, :n],
                      "labels": out["labels"][i, :n].astype(np.int64)})
    return results


def _detect(variables, canvas, taps_y, taps_x, orig_sizes, *, detector, **post_kwargs):
  """uint8 canvas [B, Hc, Wc, 3] -> padded detections (see postprocess.postprocess)."""
  images = preprocess.resize_batch(canvas, taps_y, taps_x)
  return detect_resized(variables, images, orig_sizes, detector=detector, **post_kwargs)


def postprocess_kwargs(detector: Detector) -> Dict:
  """The post-processing settings of a detector's config, as keyword arguments of postprocess.postprocess."""
  cfg = detector.config
  return dict(score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh, topk_candidates=cfg.topk_candidates,
              detections_per_img=cfg.detections_per_img, weights=tuple(cfg.box_coder_weights))


def detect_resized(variables, images, orig_sizes, *, detector, **post_kwargs):
  """float32 [B, h, w, 3] images in [0, 1] already resized to the model size, orig_sizes [B, 2] (h, w) ->
  padded detections in original pixels (see postprocess.postprocess)."""
  out = detector.module.apply(variables, images, train=False)
  return postprocess.postprocess(out["cls_logits"], out["bbox_regression"], jnp.asarray(detector.anchors),
                                 orig_sizes, detector.image_size, **post_kwargs)
