"""The datasets the pipeline reads: each a prepared TFDS builder, a label space and a COCO ground truth.

`open_source(cfg)` prepares the data if needed and returns a `Source` whose `annotations(example)` maps a TFDS
example (image left encoded) to the json's view of its objects, in the dataset's label space:
  bbox_xywh [n, 4] float32 pixels (not clamped), labels [n] int32, is_crowd [n] bool.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ssdlite_jax.data import coco_folder, coco_labels, synthetic, voc, yolo

DATASETS = ("synthetic", "coco_folder", "yolo", "voc", "coco/2017")
LABEL_MODES = ("contiguous", "category_id")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Label space and evaluation ground truth of a dataset.

  class_names[label]; label_to_category_id [num_classes] int32 (-1 for background and unused labels) maps
  model labels to the `category_id` of `gt_json`, the COCO json to evaluate the eval split against.
  """
  num_classes: int
  class_names: tuple
  label_to_category_id: np.ndarray
  gt_json: str
  train_json: str = ""   # the train split's COCO json where there is one (folders; not coco/2017)
  train_split: str = "train"
  eval_split: str = "validation"


@dataclasses.dataclass(frozen=True)
class Source:
  """An opened dataset: its prepared TFDS builder, label space, annotation reader and the data config it was
  opened with (whose pipeline settings the pipelines use)."""
  builder: tfds.core.DatasetBuilder
  info: DatasetInfo
  annotations: Callable
  config: Any


def _label_space(categories, label_mode):
  """(num_classes, class_names, label_to_category_id, category_id -> label lookup [max_id + 1] int32)."""
  if label_mode not in LABEL_MODES:
    raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
  ids = [c for c, _ in categories]
  lookup = np.full(max(ids) + 1, -1, np.int32)
  if label_mode == "category_id":
    num_classes = max(ids) + 1
    names = coco_labels.category_id_names(categories, num_classes)
    lookup[ids] = ids
  else:
    num_classes = len(ids) + 1
    names = ["__background__"] + [n for _, n in categories]
    lookup[ids] = np.arange(1, num_classes)
  to_category = np.full(num_classes, -1, np.int32)
  to_category[lookup[ids]] = ids
  return num_classes, tuple(names), to_category, lookup


def _folder_source(cfg, config, gt_json) -> Source:
  builder = coco_folder.CocoFolder(config=config, data_dir=cfg.data_dir)
  builder.download_and_prepare()
  categories = [tuple(c) for c in builder.info.metadata["categories"]]
  num_classes, names, to_category, lookup = _label_space(categories, cfg.label_mode)
  lookup = tf.constant(lookup)

  def annotations(ex):
    objects = ex["objects"]
    return objects["bbox"], tf.gather(lookup, objects["category_id"]), objects["is_crowd"]

  train_json = dict((split, ann) for split, ann, _ in config.splits).get("train", "")
  return Source(builder, DatasetInfo(num_classes, names, to_category, gt_json, train_json), annotations, cfg)


def _coco2017_gt_json(builder, path) -> str:
  """Writes (once) a COCO json of coco/2017 validation from TFDS (area is TFDS's integer area)."""
  if os.path.exists(path):
    return path
  ds = builder.as_dataset(split="validation", decoders={"image": tfds.decode.SkipDecoding()})
  ds = ds.map(lambda ex: {**ex, "image": tf.io.extract_jpeg_shape(ex["image"])})
  to_category = coco_labels.category_ids_for_names(builder.info.features["objects"]["label"].names)
  images, anns = [], []
  for ex in tfds.as_numpy(ds):
    h, w = (int(v) for v in ex["image"][:2])
    images.append({"id": int(ex["image/id"]), "file_name": ex["image/filename"].decode(), "height": h, "width": w})
    o = ex["objects"]
    for k in range(len(o["id"])):
      y1, x1, y2, x2 = (float(v) for v in o["bbox"][k])
      anns.append({"id": int(o["id"][k]), "image_id": int(ex["image/id"]), "area": float(o["area"][k]),
                   "category_id": int(to_category[o["label"][k]]), "iscrowd": int(o["is_crowd"][k]),
                   "bbox": [x1 * w, y1 * h, (x2 - x1) * w, (y2 - y1) * h]})
  categories = [{"id": i, "name": n, "supercategory": s} for i, n, s in coco_labels.COCO_CATEGORIES]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": categories}, f)
  os.replace(tmp, path)
  return path


def _coco2017_source(cfg) -> Source:
  builder = tfds.builder("coco/2017", data_dir=cfg.data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=cfg.manual_dir or None))
  tfds_to_category = coco_labels.category_ids_for_names(builder.info.features["objects"]["label"].names)
  gt_json = cfg.eval_gt_json or _coco2017_gt_json(builder, os.path.join(builder.data_dir, "instances_validation.json"))
  names = coco_labels.coco_class_names()
  to_category = np.asarray([i if n != "N/A" and i else -1 for i, n in enumerate(names)], np.int32)
  tfds_to_category = tf.constant(tfds_to_category)

  def annotations(ex):
    objects = ex["objects"]
    hw = tf.cast(tf.io.extract_jpeg_shape(ex["image"])[:2], tf.float32)
    y1, x1, y2, x2 = tf.unstack(objects["bbox"], num=4, axis=-1)
    xywh = tf.stack([x1 * hw[1], y1 * hw[0], (x2 - x1) * hw[1], (y2 - y1) * hw[0]], axis=-1)
    return xywh, tf.gather(tfds_to_category, objects["label"]), objects["is_crowd"]

  return Source(builder, DatasetInfo(coco_labels.NUM_CLASSES, tuple(names), to_category, gt_json), annotations,
                cfg)


def open_source(cfg) -> Source:
  """Prepares (if needed) and opens the dataset `cfg.name` of a data config (see data.config.default_data_config)."""
  if cfg.name == "coco/2017":
    return _coco2017_source(cfg)
  if cfg.name == "synthetic":
    root = synthetic.ensure_synthetic(cfg.data_dir, seed=cfg.synthetic_seed,
                                      num_train=cfg.synthetic_num_train, num_val=cfg.synthetic_num_val)
    config = coco_folder.folder_config(root, "annotations/instances_train.json", "annotations/instances_val.json",
                                       name=os.path.basename(root))
    return _folder_source(cfg, config, cfg.eval_gt_json or config.splits[1][1])
  if cfg.name == "coco_folder":
    config = coco_folder.folder_config(cfg.root, cfg.train_ann, cfg.val_ann, cfg.train_images, cfg.val_images)
    gt = dict((s, a) for s, a, _ in config.splits).get("validation", "")
    return _folder_source(cfg, config, cfg.eval_gt_json or gt)
  if cfg.name in ("yolo", "voc"):
    out_dir = os.path.join(cfg.data_dir, "converted")
    if cfg.name == "yolo":
      if not cfg.yaml:
        raise ValueError("data.name='yolo' needs data.yaml, the dataset's YAML file")
      images, jsons = yolo.convert(cfg.yaml, out_dir)
    else:
      if not cfg.root:
        raise ValueError("data.name='voc' needs data.root, e.g. VOCdevkit/VOC2012")
      images, jsons = voc.convert(cfg.root, cfg.voc_train_set, cfg.voc_val_set, out_dir)
    # Named after the converted jsons' content (not their mtimes): every process, converting on its own,
    # agrees on the name of the prepared data.
    digest = hashlib.sha1()
    for path in jsons.values():
      with open(path, "rb") as f:
        digest.update(f.read())
    converted = os.path.dirname(next(iter(jsons.values())))
    config = coco_folder.folder_config(converted, jsons.get("train", ""), jsons.get("validation", ""), images,
                                       images, name=f"{os.path.basename(converted)}_{digest.hexdigest()[:12]}")
    return _folder_source(cfg, config, cfg.eval_gt_json or jsons.get("validation", ""))
  raise ValueError(f"data.name must be one of {DATASETS}, got {cfg.name!r}")
