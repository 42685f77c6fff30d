"""torchvision's detection training augmentations (references/detection `ssdlite` and `ssd` presets) in TF ops.

Every op is `op(example, seed) -> example`: example {"image": [H, W, 3] uint8 or float32 in [0, 1], "boxes":
[n, 4] float32 xyxy pixels of that image, "labels": [n] int32}, seed a stateless seed [2] int64. The ops have
the parameters and distributions of torchvision (not its RNG stream). A preset is a tuple of ops (PRESETS);
`augment` runs one, each op with its own seed, then the pipeline's only resize, to the model size.
"""

import tensorflow as tf

IOU_CROP_OPTIONS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)  # 1.0 (and above) means "no crop"
ZOOM_OUT_FILL = (123.0, 117.0, 104.0)
_MAX_CROP_ROUNDS = 1000  # an option draw per round; a box-less image stops on "no crop" (p = 1/7 per round)


def _uniform(seed, shape=()):
  return tf.random.stateless_uniform(shape, seed, dtype=tf.float32)


def _box_iou(boxes, rects):
  """IoU [T, n] of boxes [n, 4] with rects [T, 4] (xyxy), as torchvision.ops.box_iou."""
  area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  area_r = (rects[:, 2] - rects[:, 0]) * (rects[:, 3] - rects[:, 1])
  lt = tf.maximum(rects[:, None, :2], boxes[None, :, :2])
  rb = tf.minimum(rects[:, None, 2:], boxes[None, :, 2:])
  wh = tf.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  return inter / (area_r[:, None] + area_b[None, :] - inter)


def iou_crop_window(height, width, boxes, seed, min_scale=0.3, max_scale=1.0, min_aspect=0.5,
                    max_aspect=2.0, options=IOU_CROP_OPTIONS, trials=40):
  """RandomIoUCrop's choice: (top, left, crop_h, crop_w) int32 and keep [n] bool (box centre strictly inside).

  Per round: draw an option; >= 1 returns the whole image, else up to `trials` crops (drawn at once; the
  first that passes wins, as in the sequential loop) must have an aspect in range, non-zero size, some box
  centre strictly inside and max IoU(kept boxes, crop) >= option. If none passes, draw a new option.
  """
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  cx, cy = 0.5 * (boxes[:, 0] + boxes[:, 2]), 0.5 * (boxes[:, 1] + boxes[:, 3])
  options = tf.constant(options, tf.float32)
  whole = (tf.constant(0), tf.constant(0), tf.cast(height, tf.int32), tf.cast(width, tf.int32),
           tf.ones_like(cx, tf.bool))

  def one_round(i, done, window):
    s_opt, s_try = tf.unstack(tf.random.experimental.stateless_split(
      tf.random.experimental.stateless_fold_in(seed, i), 2))
    min_iou = tf.gather(options, tf.random.stateless_uniform([], s_opt, 0, len(IOU_CROP_OPTIONS), tf.int32))
    u = _uniform(s_try, [trials, 4])
    r = min_scale + (max_scale - min_scale) * u[:, :2]
    new_w, new_h = tf.floor(w * r[:, 0]), tf.floor(h * r[:, 1])
    aspect = new_w / tf.maximum(new_h, 1.0)
    left, top = tf.floor((w - new_w) * u[:, 2]), tf.floor((h - new_h) * u[:, 3])
    right, bottom = left + new_w, top + new_h
    inside = ((left[:, None] < cx) & (cx < right[:, None]) & (top[:, None] < cy) & (cy < bottom[:, None]))
    iou = tf.where(inside, _box_iou(boxes, tf.stack([left, top, right, bottom], axis=1)), -1.0)
    ok = ((aspect >= min_aspect) & (aspect <= max_aspect) & (new_w > 0) & (new_h > 0)
          & tf.reduce_any(inside, axis=1) & (tf.reduce_max(iou, axis=1) >= min_iou))
    t = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
    crop = tuple(tf.cast(v[t], tf.int32) for v in (top, left, new_h, new_w)) + (inside[t],)
    no_crop = min_iou >= 1.0
    found = no_crop | tf.reduce_any(ok)
    pick = lambda a, b, c: tf.where(no_crop, a, tf.where(found, b, c))
    return i + 1, found, tuple(pick(a, b, c) for a, b, c in zip(whole, crop, window))

  _, _, window = tf.while_loop(
    lambda i, done, _: tf.logical_and(tf.logical_not(done), i < _MAX_CROP_ROUNDS),
    one_round, (tf.constant(0), tf.constant(False), whole))
  return window


def random_iou_crop(example, seed, **kwargs):
  """torchvision RandomIoUCrop (defaults: scale 0.3-1, aspect 0.5-2, options IOU_CROP_OPTIONS, 40 trials)."""
  image, boxes, labels = example["image"], example["boxes"], example["labels"]
  shape = tf.shape(image)
  top, left, crop_h, crop_w, keep = iou_crop_window(shape[0], shape[1], boxes, seed, **kwargs)
  boxes = tf.boolean_mask(boxes, keep) - tf.cast(tf.stack([left, top, left, top]), tf.float32)
  limit = tf.cast(tf.stack([crop_w, crop_h, crop_w, crop_h]), tf.float32)
  boxes = tf.clip_by_value(boxes, 0.0, limit)
  image = tf.slice(image, tf.stack([top, left, 0]), tf.stack([crop_h, crop_w, -1]))
  return {"image": image, "boxes": boxes, "labels": tf.boolean_mask(labels, keep)}


def random_horizontal_flip(example, seed, p=0.5):
  """Flips with probability p: x1' = W - x2, x2' = W - x1."""
  image, boxes = example["image"], example["boxes"]
  width = tf.cast(tf.shape(image)[1], tf.float32)
  flip = _uniform(seed) < p
  image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
  flipped = tf.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
  return {**example, "image": image, "boxes": tf.where(flip, flipped, boxes)}


def _blend(image, other, factor):
  return tf.clip_by_value(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def _grayscale(image):
  return tf.reduce_sum(image * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True)


def random_photometric_distort(example, seed, p=0.5, brightness=(0.875, 1.125), contrast=(0.5, 1.5),
                               saturation=(0.5, 1.5), hue=(-0.05, 0.05)):
  """torchvision RandomPhotometricDistort (contrast before or after sat/hue); the image becomes float32 [0, 1]."""
  image = tf.image.convert_image_dtype(example["image"], tf.float32)
  s_r, s_b, s_c, s_s, s_h, s_p = tf.unstack(tf.random.experimental.stateless_split(seed, 6))
  r = _uniform(s_r, [7])
  factor = lambda s, lo_hi: lo_hi[0] + (lo_hi[1] - lo_hi[0]) * _uniform(s)
  maybe = lambda cond, fn, img: tf.cond(cond, lambda: fn(img), lambda: img)
  adjust_contrast = lambda img: _blend(img, tf.reduce_mean(_grayscale(img)), factor(s_c, contrast))
  contrast_before = r[1] < 0.5
  image = maybe(r[0] < p, lambda img: _blend(img, 0.0, factor(s_b, brightness)), image)
  image = maybe(contrast_before & (r[2] < p), adjust_contrast, image)
  image = maybe(r[3] < p, lambda img: _blend(img, _grayscale(img), factor(s_s, saturation)), image)
  image = maybe(r[4] < p, lambda img: tf.clip_by_value(tf.image.adjust_hue(img, factor(s_h, hue)), 0.0, 1.0), image)
  image = maybe(tf.logical_not(contrast_before) & (r[5] < p), adjust_contrast, image)
  perm = tf.argsort(_uniform(s_p, [3]))
  return {**example, "image": maybe(r[6] < p, lambda img: tf.gather(img, perm, axis=-1), image)}


def random_zoom_out(example, seed, p=0.5, side_range=(1.0, 4.0), fill=ZOOM_OUT_FILL):
  """torchvision RandomZoomOut: a canvas int(side * W) x int(side * H) of fill/255; the image becomes float32."""
  image, boxes = tf.image.convert_image_dtype(example["image"], tf.float32), example["boxes"]
  u = _uniform(seed, [4])
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  side = tf.where(u[0] < p, side_range[0] + (side_range[1] - side_range[0]) * u[1], 1.0)
  canvas_w, canvas_h = tf.floor(w * side), tf.floor(h * side)
  left, top = tf.floor((canvas_w - w) * u[2]), tf.floor((canvas_h - h) * u[3])
  pads = tf.cast([[top, canvas_h - h - top], [left, canvas_w - w - left], [0.0, 0.0]], tf.int32)
  fill = tf.constant(fill, tf.float32) / 255.0
  image = tf.pad(image - fill, pads) + fill
  return {**example, "image": image, "boxes": boxes + tf.stack([left, top, left, top])}


def resize(image, boxes, size):
  """The pipeline's one resize: bilinear, half-pixel centres, no antialias, to size (h, w) (ints or an int tensor).

  Returns a float32 [h, w, 3] image in [0, 1] (uint8 input is scaled by 1/255) and boxes scaled per axis.
  """
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  out = tf.image.resize(image, size, method="bilinear", antialias=False)
  if image.dtype == tf.uint8:
    out = out * (1.0 / 255.0)
  scale_y, scale_x = tf.unstack(tf.cast(size, tf.float32) / shape)
  return out, boxes * tf.stack([scale_x, scale_y, scale_x, scale_y])


PRESETS = {
    "none": (),
    "hflip": (random_horizontal_flip,),   # torchvision's --data-augmentation hflip (the Faster R-CNN recipe)
    "ssdlite": (random_iou_crop, random_horizontal_flip),
    "ssd": (random_photometric_distort, random_zoom_out, random_iou_crop, random_horizontal_flip),
}


def augment(example, seed, preset: str, size):
  """PRESETS[preset] (op k with seed k of stateless_split(seed, len(ops))), then the resize to size (h, w):
  image [H, W, 3] uint8 -> {"image": [h, w, 3] float32 in [0, 1], "boxes": [m, 4], "labels": [m]}."""
  if preset not in PRESETS:
    raise ValueError(f"augmentation must be one of {tuple(PRESETS)}, got {preset!r}")
  ops = PRESETS[preset]
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, len(ops))) if ops else []
  for op, op_seed in zip(ops, seeds):
    example = op(example, op_seed)
  image, boxes = resize(example["image"], example["boxes"], size)
  return {**example, "image": image, "boxes": boxes}
