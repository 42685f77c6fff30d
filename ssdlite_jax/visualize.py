"""Drawing detections on images (predict.py --draw, train.py's prediction pictures)."""

import numpy as np
from PIL import Image, ImageDraw


def draw_detections(image: np.ndarray, det, class_names, min_score: float) -> Image.Image:
  """A PIL copy of `image` (H x W x 3 uint8) with the detections scoring >= min_score drawn on it.

  det: {"boxes": [n, 4] xyxy px, "scores": [n], "labels": [n]}; class_names[label] names a label.
  """
  out = Image.fromarray(image)
  draw = ImageDraw.Draw(out)
  for box, score, label in zip(det["boxes"], det["scores"], det["labels"]):
    if score < min_score:
      continue
    name = class_names[label] if 0 <= label < len(class_names) else str(label)
    color = tuple(int(c) for c in np.random.RandomState(int(label)).randint(64, 256, 3))
    draw.rectangle([float(v) for v in box], outline=color, width=2)
    draw.text((float(box[0]) + 3, float(box[1]) + 2), f"{name} {score:.2f}", fill=color)
  return out
