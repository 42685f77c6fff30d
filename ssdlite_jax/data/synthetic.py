"""An embedded synthetic detection dataset (no download), written as a COCO-format folder.

3 classes (1 ellipse, 2 rectangle, 3 triangle), 1-4 objects per 480x640 (HxW) JPEG, object boxes 60-220 px,
random colours independent of the class on smoothly-varying noisy backgrounds; some objects overlap and
some are cut by the image border. Image i of a split is drawn from `np.random.default_rng([seed, split, i])`,
so it does not depend on the split sizes. Layout: root/{train,val}/*.jpg, root/annotations/instances_{train,val}.json.
"""

import hashlib
import io
import json
import os
import shutil

import numpy as np
import PIL.Image
import PIL.ImageDraw

CATEGORIES = ((1, "ellipse"), (2, "rectangle"), (3, "triangle"))
_GENERATOR_VERSION = 1
_SPLITS = (("train", 0, 1), ("val", 1, 1_000_001))  # (name, rng stream, first image id)
_MIN_SIDE, _MAX_SIDE = 60, 220


def _background(rng, height, width) -> np.ndarray:
  """[H, W, 3] float32 0..255: a random colour gradient, coarse blotches and 2x2-pixel grain noise."""
  a = rng.uniform(0, 2 * np.pi)
  xx = np.arange(width, dtype=np.float32)[None, :] * np.cos(a)
  yy = np.arange(height, dtype=np.float32)[:, None] * np.sin(a)
  t = (xx + yy) / np.float32(np.hypot(height, width)) + 0.5
  c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
  cells = rng.integers(4, 12)
  coarse = rng.normal(128, rng.uniform(10, 40), (cells, cells, 3))
  coarse_img = PIL.Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize((width, height), PIL.Image.BILINEAR)
  img = c0 + (c1 - c0) * t[..., None] + (np.asarray(coarse_img, np.float32) - 128)
  grain = rng.standard_normal(((height + 1) // 2, (width + 1) // 2, 3), dtype=np.float32)
  img += np.repeat(np.repeat(grain, 2, 0), 2, 1)[:height, :width] * np.float32(rng.uniform(3, 20))
  return np.clip(img, 0, 255)


def _shape_mask(kind, box, height, width, rng) -> np.ndarray:
  """[H, W] bool mask of one shape drawn inside box (x0, y0, x1, y1) pixels (may extend past the image)."""
  mask = PIL.Image.new("L", (width, height), 0)
  draw = PIL.ImageDraw.Draw(mask)
  x0, y0, x1, y1 = box
  if kind == 1:
    draw.ellipse(box, fill=255)
  elif kind == 2:
    draw.rectangle(box, fill=255)
  else:
    apex = rng.uniform(0.2, 0.8)
    points = {0: [(x0 + apex * (x1 - x0), y0), (x0, y1), (x1, y1)],
              1: [(x0 + apex * (x1 - x0), y1), (x0, y0), (x1, y0)],
              2: [(x0, y0 + apex * (y1 - y0)), (x1, y0), (x1, y1)],
              3: [(x1, y0 + apex * (y1 - y0)), (x0, y0), (x0, y1)]}[int(rng.integers(4))]
    draw.polygon(points, fill=255)
  return np.asarray(mask) > 0


def _iou(a, b) -> float:
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def render_image(rng, height: int, width: int):
  """One image: ([H, W, 3] uint8, [(category_id, [x, y, w, h] visible-extent pixels)])."""
  img = _background(rng, height, width)
  bg_mean = img.mean(axis=(0, 1))
  objects, boxes = [], []
  for _ in range(int(rng.integers(1, 5))):
    for _attempt in range(20):
      w, h = rng.uniform(_MIN_SIDE, _MAX_SIDE, 2)
      # Centres stay >= 0.2 side inside the image, so up to 30% of a shape can be cut by the border.
      cx, cy = rng.uniform(0.2 * w, width - 0.2 * w), rng.uniform(0.2 * h, height - 0.2 * h)
      box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
      if all(_iou(box, b) < 0.25 for b in boxes):
        break
    else:
      continue
    kind = int(rng.integers(1, 4))
    mask = _shape_mask(kind, box, height, width, rng)
    ys, xs = np.nonzero(mask)
    if xs.size == 0 or xs.max() - xs.min() < 8 or ys.max() - ys.min() < 8:
      continue
    colour = rng.uniform(0, 255, 3)
    while np.abs(colour - bg_mean).sum() < 120:
      colour = rng.uniform(0, 255, 3)
    shade = colour + rng.normal(0, 6, (mask.sum(), 3))
    img[mask] = np.clip(shade, 0, 255)
    boxes.append(box)
    x_min, y_min = float(xs.min()), float(ys.min())
    objects.append((kind, [x_min, y_min, float(xs.max() + 1) - x_min, float(ys.max() + 1) - y_min]))
  return img.astype(np.uint8), objects


def _write_split(root, split, stream, first_id, count, seed, height, width):
  os.makedirs(os.path.join(root, split), exist_ok=True)
  images, annotations = [], []
  for i in range(count):
    image_id = first_id + i
    pixels, objects = render_image(np.random.default_rng([seed, stream, i]), height, width)
    file_name = f"{image_id:012d}.jpg"
    buf = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    with open(os.path.join(root, split, file_name), "wb") as f:
      f.write(buf.getvalue())
    images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
    for kind, bbox in objects:
      annotations.append({"id": len(annotations) + 1 + 10_000_000 * stream, "image_id": image_id,
                          "category_id": kind, "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
  categories = [{"id": i, "name": n, "supercategory": "shape"} for i, n in CATEGORIES]
  with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
    json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def ensure_synthetic(parent_dir: str, *, seed: int = 0, num_train: int = 1000, num_val: int = 100,
                     height: int = 480, width: int = 640) -> str:
  """Generates the dataset under parent_dir (once per parameter set) and returns its root folder."""
  params = {"version": _GENERATOR_VERSION, "seed": seed, "num_train": num_train, "num_val": num_val,
            "height": height, "width": width}
  digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
  root = os.path.join(parent_dir, f"synthetic_shapes_{digest}")
  done = os.path.join(root, "params.json")
  if os.path.exists(done):
    return root
  tmp = root + ".incomplete"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(os.path.join(tmp, "annotations"))
  for split, stream, first_id in _SPLITS:
    _write_split(tmp, split, stream, first_id, num_train if split == "train" else num_val,
                 seed, height, width)
  with open(os.path.join(tmp, "params.json"), "w") as f:
    json.dump(params, f)
  shutil.rmtree(root, ignore_errors=True)
  os.replace(tmp, root)
  return root
