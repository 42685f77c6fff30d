"""tf.data input pipelines: deterministic, resumable training batches and padded evaluation batches.

Batches are dicts of numpy arrays (B = per-process batch = global_batch_size // process_count):
  image     float32 [B, H, W, 3] RGB in [0, 1], resized to image_size (H, W) (eval with image_size None: uint8
            [1, h, w, 3] as decoded, boxes in its pixels; training with aspect-ratio Groups: each image resized by
            the detector's rule, top-left on its group's canvas (H, W), zeros beyond)
  image_size int32 [B, 2], training with Groups only: each image's resized (h, w)
  boxes     float32 [B, max_boxes, 4] xyxy pixels of the resized image;  labels int32 [B, max_boxes]
  mask      bool [B, max_boxes], True for real boxes
  image_id  int64 [B] (-1 for eval padding);  orig_size int32 [B, 2] (height, width) of the stored image
  valid     bool [B], eval only: False for the padding examples that complete the last batch

Training order: every process builds the same stream of undecoded records (the whole train split, images
without a usable annotation dropped as torchvision does), epochs e = 0, 1, ... each shuffled with a seed
derived from (seed, e), and cuts it into consecutive global batches of `global_batch_size` records; process p
keeps the slice [p * B, (p + 1) * B) of each global batch (filtered on the record's position, before
decoding, so each process decodes only its own images). Augmentation draws from a stateless seed of
(seed, e, image_id). Global batch k is therefore a pure function of (config, seed, k), the same examples in
the same order for any process count (the processes' batches k concatenated in process order), and
`start_step=k` resumes there, after one annotation-only counting pass over the split and a skip of under
one epoch of undecoded records.

A detector that resizes each image itself (Faster R-CNN: input_size None) trains on aspect-ratio groups instead, as
torchvision's GroupedBatchSampler (aspect_ratio_groups): each epoch's shuffled records are grouped by their image's
w / h bin, and a global batch is `global_batch_size` records of one group, in the order the groups fill up (each
group's last, incomplete batch of the epoch is dropped). Every group has one canvas, the largest resized image of
the split in it rounded up to the detector's multiple: one compiled program per group. Global batch k is again a pure
function of (config, seed, k); resuming skips undecoded records of one epoch.
"""

import bisect
import dataclasses
import logging
import math
import os
from typing import Callable, Dict, Optional, Tuple

import ml_collections
import numpy as np
try:
  import tensorflow as tf
  import tensorflow_datasets as tfds
except ImportError as e:
  raise ImportError(f"{e}: the input pipelines (train.py, eval.py) need TensorFlow and TFDS: "
                    "pip install 'ssdlite-jax[data]', or -r requirements.txt") from e

from ssdlite_jax.data import augment, cleaning, sources

_EPOCHS = 1 << 40  # "forever"


def open_source(cfg) -> sources.Source:
  """Prepares (if needed) and opens the dataset of data config `cfg` (a copy, data_dir expanded), once per
  program: the pipelines below take the opened source; source.info is the label space and ground truth.
  Keeps TensorFlow off accelerators."""
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # already initialised, or no such device type
      pass
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.data_dir = os.path.expanduser(cfg.data_dir)
  return sources.open_source(cfg)


def num_train_examples(source: sources.Source) -> int:
  """Examples in the prepared train split (TFDS metadata; before torchvision's no-annotation filter)."""
  return source.builder.info.splits[source.info.train_split].num_examples


def eval_examples(source: sources.Source, count: int) -> list:
  """The first `count` eval examples at their original size: [{"image": H x W x 3 uint8 RGB, "boxes": [n, 4]
  float32 xyxy px and "labels": [n] int32 as training cleans them (crowd objects and empty boxes dropped),
  "image_id"}]."""
  def example(ex):
    image = tf.io.decode_image(ex["image"], channels=3, expand_animations=False)
    size = tf.shape(image)[:2]
    boxes, labels = cleaning.clean_boxes(*source.annotations(ex), size[0], size[1])
    return {"image": image, "boxes": boxes, "labels": labels, "image_id": ex["image/id"]}
  return list(tfds.as_numpy(_read(source, _first(source, source.info.eval_split, count)).map(example)))


def calibration_images(source: sources.Source, count: int, image_size) -> np.ndarray:
  """The first `count` train images preprocessed as for evaluation (resized to image_size (H, W), no
  augmentation) as the uint8 pixels a deployed model is fed: [count, H, W, 3] RGB (int8 export calibration)."""
  cfg = source.config
  size = tuple(int(s) for s in image_size)
  if count <= 0:
    return np.zeros((0,) + size + (3,), np.uint8)
  zero_seed = tf.zeros([2], tf.int64)
  ds = _read(source, _first(source, source.info.train_split, count)).map(
    lambda ex: _example(ex, source.annotations(ex), "none", size, cfg.max_boxes, zero_seed)["image"])
  images = np.stack(list(tfds.as_numpy(ds)))
  return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def _process(process_index, process_count, global_batch_size):
  if process_index is None or process_count is None:
    import jax
    process_index, process_count = jax.process_index(), jax.process_count()
  if global_batch_size % process_count:
    raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} processes")
  return process_index, process_count, global_batch_size // process_count


def _first(source, split, count):
  """The split of the first `count` examples: read through TFDS's slicing rather than `.take`, whose partial
  read of TFDS's in-memory cache of small datasets makes tf.data warn."""
  return f"{split}[:{min(count, source.builder.info.splits[split].num_examples)}]"


def _read(source, split):
  return source.builder.as_dataset(split=split, shuffle_files=False,
                                   decoders={"image": tfds.decode.SkipDecoding()})


def _example(ex, annotations, kind, size, max_boxes, seed, canvas=None):
  """Decodes, cleans, augments, resizes and pads one TFDS example (its `annotations`: source.annotations') to the
  batch format (+ '_num_boxes'); with `canvas` (H, W) (a tensor, as `size` then), the resized image goes top-left on
  a zero canvas of that size and "image_size" is added."""
  image = tf.io.decode_image(ex["image"], channels=3, expand_animations=False)
  orig_size = tf.shape(image)[:2]
  boxes, labels = cleaning.clean_boxes(*annotations, orig_size[0], orig_size[1])
  extra = {}
  if size is not None:
    example = augment.augment({"image": image, "boxes": boxes, "labels": labels}, seed, kind, size)
    image, boxes, labels = example["image"], example["boxes"], example["labels"]
    if canvas is None:
      image.set_shape(list(size) + [3])
    else:
      image = tf.image.pad_to_bounding_box(image, 0, 0, canvas[0], canvas[1])
      extra["image_size"] = tf.cast(size, tf.int32)
  num = tf.shape(boxes)[0]
  kept = tf.minimum(num, max_boxes)
  return {
    **extra,
    "image": image,
    "boxes": tf.ensure_shape(tf.pad(boxes[:kept], [[0, max_boxes - kept], [0, 0]]), [max_boxes, 4]),
    "labels": tf.ensure_shape(tf.pad(labels[:kept], [[0, max_boxes - kept]]), [max_boxes]),
    "mask": tf.range(max_boxes) < kept,
    "image_id": ex["image/id"],
    "orig_size": orig_size,
    "_num_boxes": num,
  }


def _numpy_batches(ds, max_boxes):
  """Yields numpy batches; warns (count and image id) for each image that had more than max_boxes boxes."""
  for batch in tfds.as_numpy(ds):
    num = batch.pop("_num_boxes")
    for i in np.flatnonzero(num > max_boxes):
      logging.warning("image id %d has %d boxes, more than max_boxes=%d: kept the first %d",
                      batch["image_id"][i], num[i], max_boxes, max_boxes)
    yield batch


def _options():
  options = tf.data.Options()
  options.deterministic = True
  return options


def _parallel(cfg):
  return tf.data.AUTOTUNE if cfg.num_parallel_calls < 0 else cfg.num_parallel_calls


def _stored_size(data):
  """(h, w) int32 of an encoded image: read from a JPEG's header, else decoded."""
  return tf.cond(tf.io.is_jpeg(data), lambda: tf.io.extract_jpeg_shape(data)[:2],
                 lambda: tf.shape(tf.io.decode_image(data, channels=3, expand_animations=False))[:2])


def _train_records(source):
  """The train split's undecoded records, less the images without a usable annotation (as torchvision)."""
  return _read(source, source.info.train_split).filter(
    lambda ex: cleaning.has_usable_annotation(source.annotations(ex)[0]))


@dataclasses.dataclass(frozen=True)
class Groups:
  """The train split's aspect-ratio groups (see aspect_ratio_groups), per record in the split's order: `ids` int64
  [N] image ids, `resized` int32 [N, 2] (h', w') and `group` int64 [N]; `canvases` {group: (H, W)}."""
  ids: np.ndarray
  resized: np.ndarray
  group: np.ndarray
  canvases: Dict[int, Tuple[int, int]]

  def batches_per_epoch(self, global_batch_size: int) -> int:
    """Global batches an epoch yields: each group's full batches."""
    return int(sum(np.sum(self.group == g) // global_batch_size for g in self.canvases))

  def describe(self, global_batch_size: int) -> str:
    """One line: each group's canvas, images and batches per epoch."""
    return ", ".join(f"{h}x{w} ({np.sum(self.group == g)} images, {np.sum(self.group == g) // global_batch_size} "
                     f"batches)" for g, (h, w) in sorted(self.canvases.items()))


def aspect_ratio_bins(factor: int) -> Tuple[float, ...]:
  """torchvision's create_aspect_ratio_groups bins of w / h: 2 ** linspace(-1, 1, 2k + 1) (k > 0), else (1.0,);
  None for factor < 0 (no grouping: one group)."""
  if factor < 0:
    return None
  return tuple((2.0 ** np.linspace(-1, 1, 2 * factor + 1)).tolist()) if factor > 0 else (1.0,)


def aspect_ratio_groups(source: sources.Source, resized_size: Callable, size_divisible: int,
                        factor: int) -> Groups:
  """Groups of the train split for a detector that resizes each image by `resized_size` ((h, w) -> (h', w')): the
  group of an image is bisect_right(aspect_ratio_bins(factor), w / h), as torchvision's _quantize; one pass over
  the split reads every image's size (JPEG headers; other formats are decoded)."""
  sizes = _train_records(source).map(lambda ex: (ex["image/id"], _stored_size(ex["image"])),
                                     num_parallel_calls=_parallel(source.config), deterministic=True)
  rows = list(tfds.as_numpy(sizes))
  if not rows:
    raise ValueError(f"data {source.config.name!r}: the train split has no image with a usable annotation")
  ids = np.array([r[0] for r in rows], np.int64)
  if len(np.unique(ids)) != len(ids):
    raise ValueError(f"data {source.config.name!r}: image ids repeat in the train split; aspect-ratio groups key "
                     "on them")
  bins = aspect_ratio_bins(factor)
  group = np.array([0 if bins is None else bisect.bisect_right(bins, float(w) / float(h)) for _, (h, w) in rows])
  resized = np.array([resized_size((int(h), int(w))) for _, (h, w) in rows], np.int32)
  up = lambda x: int(-(-x // size_divisible) * size_divisible)
  canvases = {int(g): tuple(up(v) for v in resized[group == g].max(axis=0)) for g in np.unique(group)}
  return Groups(ids, resized, group, canvases)


def create_train_dataset(source: sources.Source, *, global_batch_size, image_size, seed, process_index=None,
                         process_count=None, start_step=0, groups: Optional[Groups] = None):
  """Infinite iterator of training batches of this process; the first one is batch `start_step`.

  image_size (h, w) of the model input; or None with `groups` (aspect_ratio_groups') for a detector that resizes
  each image itself. seed fixes the order and the augmentation.
  """
  cfg = source.config
  index, count, batch = _process(process_index, process_count, global_batch_size)
  if (image_size is None) == (groups is None):
    raise ValueError("create_train_dataset: pass image_size or, for per-image resizing, groups (not both)")
  base = _train_records(source)

  def epoch_records(e):
    epoch_seed = tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), e)
    shuffle_seed = tf.random.stateless_uniform([], epoch_seed, None, None, tf.int64)
    return base.shuffle(cfg.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False).map(
      lambda ex: (epoch_seed, ex))

  if groups is None:
    size = tuple(int(s) for s in image_size)
    first_epoch, offset = 0, 0
    if start_step:
      epoch_size = int(base.reduce(np.int64(0), lambda n, _: n + 1))
      first_epoch, offset = divmod(start_step * global_batch_size, epoch_size)

    def example(epoch_seed, ex):
      aug_seed = tf.random.experimental.stateless_fold_in(epoch_seed, ex["image/id"])
      return _example(ex, source.annotations(ex), cfg.augmentation, size, cfg.max_boxes, aug_seed)

    # The global stream starts at a global batch boundary (offset = start_step * global_batch_size records into
    # the epoch), so position i is row i % global_batch_size of its global batch.
    ds = tf.data.Dataset.range(first_epoch, _EPOCHS).flat_map(epoch_records).skip(offset)
  else:
    ds, example = _grouped_stream(source, groups, global_batch_size, start_step, epoch_records)
  if count > 1:
    lo, hi = index * batch, (index + 1) * batch
    ds = ds.enumerate().filter(lambda i, rec: (lo <= i % global_batch_size) & (i % global_batch_size < hi))
    ds = ds.map(lambda i, rec: rec)
  ds = ds.map(example, num_parallel_calls=_parallel(cfg), deterministic=True)
  ds = ds.batch(batch, drop_remainder=True).prefetch(cfg.prefetch).with_options(_options())
  return _numpy_batches(ds, cfg.max_boxes)


def _grouped_stream(source, groups, global_batch_size, start_step, epoch_records):
  """(the record stream of global batches of one group each, from global batch start_step; its `example` map).
  Records are grouped as scalars (the annotations serialised), so a group's window batches."""
  cfg = source.config
  per_epoch = groups.batches_per_epoch(global_batch_size)
  if per_epoch == 0:
    raise ValueError(f"no aspect-ratio group of {source.config.name!r} holds a global batch of {global_batch_size} "
                     f"images ({groups.describe(global_batch_size)}): lower batch_size or "
                     "data.aspect_ratio_group_factor")
  first_epoch, offset = divmod(start_step, per_epoch)
  row_of = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
    tf.constant(groups.ids), tf.range(len(groups.ids), dtype=tf.int64)), -1)
  group_of, resized = tf.constant(groups.group, tf.int64), tf.constant(groups.resized)
  canvas = np.zeros((max(groups.canvases) + 1, 2), np.int32)
  for g, hw in groups.canvases.items():
    canvas[g] = hw
  canvas = tf.constant(canvas)

  def scalars(epoch_seed, ex):
    bbox, labels, crowd = source.annotations(ex)
    return {"seed": epoch_seed, "image": ex["image"], "image/id": ex["image/id"], "row": row_of.lookup(ex["image/id"]),
            "bbox": tf.io.serialize_tensor(tf.cast(bbox, tf.float32)),
            "labels": tf.io.serialize_tensor(tf.cast(labels, tf.int32)),
            "crowd": tf.io.serialize_tensor(tf.cast(crowd, tf.bool))}

  def epoch(e):
    return epoch_records(e).map(scalars).group_by_window(
      key_func=lambda r: tf.gather(group_of, r["row"]), window_size=global_batch_size,
      reduce_func=lambda _, window: window.batch(global_batch_size, drop_remainder=True))

  def example(r):
    annotations = (tf.ensure_shape(tf.io.parse_tensor(r["bbox"], tf.float32), [None, 4]),
                   tf.ensure_shape(tf.io.parse_tensor(r["labels"], tf.int32), [None]),
                   tf.ensure_shape(tf.io.parse_tensor(r["crowd"], tf.bool), [None]))
    aug_seed = tf.random.experimental.stateless_fold_in(r["seed"], r["image/id"])
    return _example(r, annotations, cfg.augmentation, tf.gather(resized, r["row"]), cfg.max_boxes, aug_seed,
                    canvas=tf.gather(canvas, tf.gather(group_of, r["row"])))

  ds = tf.data.Dataset.range(first_epoch, _EPOCHS).flat_map(epoch).skip(offset).unbatch()
  return ds, example


class _Batches:
  """Re-iterable eval batches; len() is the number of batches (the same on every process)."""

  def __init__(self, ds, num_batches, max_boxes):
    self._ds, self._num_batches, self._max_boxes = ds, num_batches, max_boxes

  def __iter__(self):
    return _numpy_batches(self._ds, self._max_boxes)

  def __len__(self):
    return self._num_batches


def create_eval_dataset(source: sources.Source, *, global_batch_size, image_size, process_index=None,
                        process_count=None):
  """(re-iterable eval batches of this process, num_batches): every image of the eval split exactly once
  over all processes, in the prepared (TFDS) order, the last batch padded with valid=False examples.
  image_size None: each image as decoded (uint8 [1, h, w, 3], its boxes in its own pixels), one per process and
  batch (global_batch_size is then the process count), for a detector whose transform resizes per image."""
  cfg = source.config
  index, count, batch = _process(process_index, process_count, global_batch_size)
  if image_size is None and batch != 1:
    raise ValueError(f"unresized eval images go one per process and batch: global_batch_size={global_batch_size} "
                     f"with {count} process(es)")
  size = None if image_size is None else tuple(int(s) for s in image_size)
  splits = tfds.even_splits(source.info.eval_split, n=count)
  sizes = [source.builder.info.splits[s].num_examples for s in splits]
  num_batches = math.ceil(max(sizes) / batch)
  zero_seed = tf.zeros([2], tf.int64)
  ds = _read(source, splits[index]).map(
    lambda ex: {**_example(ex, source.annotations(ex), "none", size, cfg.max_boxes, zero_seed), "valid": True},
    num_parallel_calls=_parallel(cfg), deterministic=True)
  pad = {
    "image": tf.zeros((1, 1, 3), tf.uint8) if size is None else tf.zeros(size + (3,), tf.float32),
    "boxes": tf.zeros([cfg.max_boxes, 4], tf.float32),
    "labels": tf.zeros([cfg.max_boxes], tf.int32),
    "mask": tf.zeros([cfg.max_boxes], tf.bool),
    "image_id": tf.constant(-1, tf.int64),
    "orig_size": tf.zeros([2], tf.int32),
    "_num_boxes": tf.constant(0, tf.int32),
    "valid": tf.constant(False),
  }
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(num_batches * batch - sizes[index]))
  ds = ds.batch(batch).prefetch(cfg.prefetch).with_options(_options())
  return _Batches(ds, num_batches, cfg.max_boxes), num_batches
