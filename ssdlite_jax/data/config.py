"""`config.data`: which dataset, where it lives and how it is batched and augmented (TensorFlow-free, so that
configs load without it)."""

import ml_collections


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults of `config.data`.

  name: 'synthetic' | 'coco_folder' | 'yolo' | 'voc' | 'coco/2017' (yolo and voc are converted to COCO jsons
    under data_dir/converted, then prepared as coco_folder).
  data_dir: TFDS data dir for prepared data (and the generated synthetic folder).
  manual_dir: coco/2017 only, the folder with the original zips (train2017.zip, val2017.zip, test2017.zip,
    annotations_trainval2017.zip, image_info_test2017.zip); empty when already prepared.
  root, train_ann, val_ann, train_images, val_images: coco_folder; jsons and image dirs relative to root
    (image dir defaults to root/<json stem without 'instances_'>).
  yaml: yolo only, the Ultralytics dataset YAML (see data/yolo.py).
  root (voc): the VOC tree (VOCdevkit/VOC2012); voc_train_set, voc_val_set: its ImageSets/Main lists.
  label_mode: coco_folder / synthetic: 'contiguous' (labels 1..N in category-id order, 0 = background) or
    'category_id' (label = raw category id, num_classes = max id + 1). coco/2017 always uses category ids 1..90.
  eval_gt_json: COCO json to evaluate against; default: the val json (folders) or, for coco/2017, one written
    from TFDS (pass the official instances_val2017.json for exact areas).
  synthetic_seed, synthetic_num_train, synthetic_num_val: the embedded synthetic dataset.
  augmentation: 'ssdlite' | 'ssd' | 'hflip' | 'none' (training; evaluation never augments).
  aspect_ratio_group_factor: training a detector that resizes each image itself (Faster R-CNN), its batches group
    images by w / h into 2k + 2 bins (torchvision's --aspect-ratio-group-factor, default 3), one canvas (compiled
    program) each; -1: one group, one canvas.
  max_boxes: boxes per image in a batch; an image with more is truncated with a logged warning.
  shuffle_buffer: examples (undecoded) in the per-epoch shuffle buffer.
  num_parallel_calls: decode/augment parallelism (-1 = tf.data.AUTOTUNE).
  prefetch: batches prefetched.
  """
  return ml_collections.ConfigDict({
    "name": "synthetic",
    "data_dir": "~/tensorflow_datasets",
    "manual_dir": "",
    "root": "",
    "train_ann": "",
    "val_ann": "",
    "train_images": "",
    "val_images": "",
    "yaml": "",
    "voc_train_set": "train",
    "voc_val_set": "val",
    "label_mode": "contiguous",
    "eval_gt_json": "",
    "synthetic_seed": 0,
    "synthetic_num_train": 1000,
    "synthetic_num_val": 100,
    "augmentation": "ssdlite",
    "aspect_ratio_group_factor": 3,
    "max_boxes": 100,
    "shuffle_buffer": 2048,
    "num_parallel_calls": -1,
    "prefetch": 2,
  })
