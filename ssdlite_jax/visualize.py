"""Drawing boxes on images (predict.py --draw, the validation mosaics of train.py / eval.py).

Line width and font grow with the image (Ultralytics' rule: 0.3 % and 3.5 % of the mean side, at least 2 px
and 12 px); each label is written on a filled box of its class colour, one colour per class.
"""

from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# 20 distinguishable colours (RGB), cycled by label.
PALETTE = ((255, 56, 56), (255, 157, 151), (255, 112, 31), (255, 178, 29), (207, 210, 49), (72, 249, 10),
           (146, 204, 23), (61, 219, 134), (26, 147, 52), (0, 212, 187), (44, 153, 168), (0, 194, 255),
           (52, 69, 147), (100, 115, 255), (0, 24, 236), (132, 56, 255), (82, 0, 133), (203, 56, 255),
           (255, 149, 200), (255, 55, 199))


def class_color(label: int):
  return PALETTE[int(label) % len(PALETTE)]


def draw_boxes(image: np.ndarray, boxes, labels, class_names: Sequence[str],
               scores: Optional[Sequence[float]] = None, min_score: float = 0.0) -> Image.Image:
  """A PIL copy of `image` (H x W x 3 uint8) with boxes [n, 4] xyxy px drawn and labelled 'name' or
  'name 0.87' (with scores: only those >= min_score)."""
  out = Image.fromarray(np.asarray(image, np.uint8))
  draw = ImageDraw.Draw(out)
  side = (out.width + out.height) / 2
  width = max(round(side * 0.003), 2)
  font = ImageFont.load_default(size=max(round(side * 0.035), 12))
  for k, (box, label) in enumerate(zip(np.asarray(boxes, np.float64).reshape(-1, 4), labels)):
    if scores is not None and scores[k] < min_score:
      continue
    label = int(label)
    name = class_names[label] if 0 <= label < len(class_names) else str(label)
    text = name if scores is None else f"{name} {float(scores[k]):.2f}"
    color = class_color(label)
    x1, y1, x2, y2 = (float(v) for v in box)
    draw.rectangle([x1, y1, x2, y2], outline=color, width=width)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left + 2 * width, bottom - top + 2 * width
    ty = y1 - th if y1 - th >= 0 else y1          # above the box, else inside it
    tx = min(max(x1, 0), max(out.width - tw, 0))
    draw.rectangle([tx, ty, tx + tw, ty + th], fill=color)
    ink = (0, 0, 0) if sum(c * w for c, w in zip(color, (0.299, 0.587, 0.114))) > 150 else (255, 255, 255)
    draw.text((tx + width - left, ty + width - top), text, fill=ink, font=font)
  return out


def draw_detections(image: np.ndarray, det, class_names, min_score: float) -> Image.Image:
  """draw_boxes of det = {"boxes": [n, 4] xyxy px, "scores": [n], "labels": [n]} scoring >= min_score."""
  return draw_boxes(image, det["boxes"], det["labels"], class_names, det["scores"], min_score)


def mosaic(images: Sequence[Image.Image], columns: int = 4, cell: int = 480) -> Image.Image:
  """The images fitted (aspect kept, centred) into a grid of cell x cell px tiles, row by row, on grey."""
  rows = max(1, -(-len(images) // columns))
  out = Image.new("RGB", (columns * cell, rows * cell), (114, 114, 114))
  for k, im in enumerate(images):
    scale = cell / max(im.width, im.height)
    tile = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
    r, c = divmod(k, columns)
    out.paste(tile, (c * cell + (cell - tile.width) // 2, r * cell + (cell - tile.height) // 2))
  return out
