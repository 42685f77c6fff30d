"""torchvision `references/detection/coco_utils.py` annotation rules, as TF graph ops on one image."""

import tensorflow as tf


def clean_boxes(bbox_xywh, labels, is_crowd, height, width):
  """Drops crowd objects, xywh -> xyxy, clamps to the image, drops boxes without x2 > x1 and y2 > y1.

  bbox_xywh [n, 4] float32 pixels, labels [n] int32, is_crowd [n] bool, height/width scalars.
  Returns (boxes [m, 4] float32 xyxy pixels, labels [m] int32).
  """
  keep = tf.logical_not(is_crowd)
  xywh = tf.boolean_mask(bbox_xywh, keep)
  labels = tf.boolean_mask(labels, keep)
  x1, y1, w, h = tf.unstack(xywh, num=4, axis=-1)
  width, height = tf.cast(width, tf.float32), tf.cast(height, tf.float32)
  x1, x2 = tf.clip_by_value(x1, 0.0, width), tf.clip_by_value(x1 + w, 0.0, width)
  y1, y2 = tf.clip_by_value(y1, 0.0, height), tf.clip_by_value(y1 + h, 0.0, height)
  boxes = tf.stack([x1, y1, x2, y2], axis=-1)
  valid = tf.logical_and(x2 > x1, y2 > y1)
  return tf.boolean_mask(boxes, valid), tf.boolean_mask(labels, valid)


def has_usable_annotation(bbox_xywh):
  """torchvision's training filter: some annotation (crowd ones count) has width > 1 and height > 1 pixels.

  bbox_xywh [n, 4] float32 pixels as in the json. Returns a bool scalar.
  """
  return tf.reduce_any(tf.logical_and(bbox_xywh[:, 2] > 1.0, bbox_xywh[:, 3] > 1.0))
