"""The detect function shared by the Predictor, evaluation and export: model forward + post-processing."""

import functools
from typing import Callable, Dict

import jax
import jax.numpy as jnp

from ssdlite_jax.ssd import postprocess
from ssdlite_jax.models import Detector


def postprocess_kwargs(detector: Detector) -> Dict:
  """The post-processing settings of a detector's config, as keyword arguments of postprocess.postprocess."""
  cfg = detector.config
  return dict(score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh, topk_candidates=cfg.topk_candidates,
              detections_per_img=cfg.detections_per_img, weights=tuple(cfg.box_coder_weights))


def detect(variables, images, orig_sizes, *, detector: Detector):
  """float32 [B, h, w, 3] images in [0, 1] already resized to the model size, orig_sizes int32 [B, 2] (h, w)
  -> padded detections {boxes [B, D, 4] xyxy original px, scores [B, D], labels [B, D], valid [B, D]}."""
  out = detector.module.apply(variables, images, train=False)
  return postprocess.postprocess(out["cls_logits"], out["bbox_regression"], jnp.asarray(detector.anchors),
                                 orig_sizes, detector.image_size, **postprocess_kwargs(detector))


_jit_detect = jax.jit(detect, static_argnames="detector")


def make_detect_fn(detector: Detector) -> Callable:
  """`detect` jitted for this detector: fn(variables, images, orig_sizes) -> padded detections. Equal detectors
  share the compiled programs (one jit keyed on the detector's value)."""
  return functools.partial(_jit_detect, detector=detector)
