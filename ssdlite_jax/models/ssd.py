"""The SSD detector: normalise -> backbone feature maps -> classification and regression heads."""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ssdlite_jax.dtypes import wide_dtype


class SSD(nn.Module):
  """images [B, H, W, 3] RGB in [0, 1] -> {"cls_logits": [B, A, K], "bbox_regression": [B, A, 4]}.

  Outputs are float32 (float64 for a float64 model) whatever the compute dtype.

  `backbone` maps normalised images to a list of NHWC feature maps; `head` is a head class called as
  head(num_anchors, num_outputs, ...) for the classification (K outputs) and regression (4) heads.
  """
  backbone: nn.Module
  head: Any
  num_classes: int
  num_anchors: Sequence[int]
  image_mean: Sequence[float] = (0.5, 0.5, 0.5)
  image_std: Sequence[float] = (0.5, 0.5, 0.5)
  head_kwargs: Any = None

  @nn.compact
  def __call__(self, images, train: bool = False):
    features = self.feature_maps(images, train)
    kw = dict(self.head_kwargs or {})
    cls_logits = self.head(self.num_anchors, self.num_classes, name="classification_head", **kw)(features, train)
    bbox = self.head(self.num_anchors, 4, name="regression_head", **kw)(features, train)
    return {"cls_logits": cls_logits.astype(wide_dtype(cls_logits.dtype)),
            "bbox_regression": bbox.astype(wide_dtype(bbox.dtype))}

  def feature_maps(self, images, train: bool = False):
    """The backbone's feature maps for images [B, H, W, 3] in [0, 1] (for inspection and parity tests)."""
    dtype = wide_dtype(images.dtype)
    mean = jnp.asarray(self.image_mean, dtype)
    std = jnp.asarray(self.image_std, dtype)
    return self.backbone((images.astype(dtype) - mean) / std, train)
