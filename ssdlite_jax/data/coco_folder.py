"""TFDS builder for any COCO-format folder: an images directory plus an `instances_*.json` per split.

Prepared examples keep the annotations as the json has them (the pipeline applies torchvision's cleaning):
  image           encoded RGB-decodable bytes (original JPEG, or a lossless PNG of PIL's `.convert("RGB")`)
  image/id        int64 COCO image id;  image/filename  str
  objects/bbox    float32 [n, 4] xywh pixels exactly as in the json (not clamped)
  objects/category_id int64 [n];  objects/is_crowd bool [n];  objects/id int64 [n] annotation id

Pixel frame: COCO boxes refer to the image as stored. Like torchvision (PIL without `exif_transpose`)
and `tf.io.decode_image`, EXIF orientation is ignored; if the json width/height do not match the stored
pixels the image is rejected with an error that names the file (and its EXIF orientation when set).
Grayscale / palette / RGBA / CMYK / PNG images are converted to RGB as PIL's `convert("RGB")` does.
Broken data (missing or corrupt files, unknown category or image ids, non-finite boxes) raises
`CocoFormatError` naming the file or the annotation id before anything is written.
"""

import dataclasses
import hashlib
import io
import json
import math
import os
from typing import Optional

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from ssdlite_jax import files

_EXIF_ORIENTATION = 0x0112


class CocoFormatError(ValueError):
  """A COCO-format folder that cannot be converted unambiguously."""


@dataclasses.dataclass(eq=False)
class CocoFolderConfig(tfds.core.BuilderConfig):
  """Where a COCO-format folder lives. `splits`: ((split_name, annotation_json, images_dir), ...), absolute paths."""
  splits: tuple = ()


def folder_config(root: str, train_ann: str, val_ann: str = "", train_images: str = "",
                  val_images: str = "", name: str = "") -> CocoFolderConfig:
  """Config for `root` (a local folder or one in object storage, gs://...: files.py); relative paths are under
  `root`; images dir defaults to root/<json stem minus 'instances_'>.

  The config name (the prepared-data directory) is `name`, else derived from the folder and a hash of the
  annotation files' paths, sizes and mtimes, so editing the json re-prepares the data.
  """
  splits = []
  for split, ann, images in (("train", train_ann, train_images), ("validation", val_ann, val_images)):
    if not ann:
      continue
    ann = os.path.join(root, ann)
    if not images:
      images = os.path.splitext(os.path.basename(ann))[0].removeprefix("instances_")
    splits.append((split, str(files.absolute(ann)), str(files.absolute(os.path.join(root, images)))))
  if not splits:
    raise ValueError("a COCO folder needs at least one annotation json (train_ann / val_ann)")
  if not name:
    stamp = [(ann, *files.size_and_mtime(ann)) if files.exists(ann) else (ann,) for _, ann, _ in splits]
    digest = hashlib.sha1(json.dumps([splits, stamp]).encode()).hexdigest()[:12]
    base = "".join(c if c.isalnum() else "_" for c in files.absolute(root).name)
    name = f"{base}_{digest}"
  return CocoFolderConfig(name=name, version="1.0.0", splits=tuple(splits))


def converted_dir(out_dir: str, kind: str, root: str, key: str) -> str:
  """out_dir/<kind>_<root's folder name>_<12 hex digits of sha1(key)>: where a converter to COCO jsons (yolo.py,
  voc.py) writes one dataset's; `key` names that dataset (its yaml path, its image sets)."""
  digest = hashlib.sha1(key.encode()).hexdigest()[:12]
  return os.path.join(os.path.expanduser(out_dir), f"{kind}_{os.path.basename(root)}_{digest}")


def write_instances_json(path: str, images, annotations, categories) -> str:
  """Writes a COCO instances json atomically (several processes may write the same one), and only when its
  content changes. Returns path."""
  text = json.dumps({"images": images, "annotations": annotations, "categories": categories})
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return path
  return files.write_text_atomically(path, text)


def split_summary(name: str, images, annotations, categories) -> str:
  """'name: N images (K without objects), M boxes: cat a, ...' of COCO lists (crowd boxes counted apart, and
  not as objects)."""
  counts = {c["id"]: 0 for c in categories}
  crowd = 0
  for a in annotations:
    if a.get("iscrowd"):
      crowd += 1
    else:
      counts[a["category_id"]] += 1
  background = len(images) - len({a["image_id"] for a in annotations if not a.get("iscrowd")})
  per_class = ", ".join(f"{c['name']} {counts[c['id']]}" for c in categories)
  return (f"{name}: {len(images)} images ({background} without objects), {sum(counts.values())} boxes"
          + (f" (+{crowd} ignored)" if crowd else "") + f": {per_class}")


def load_annotations(ann_path: str) -> dict:
  """Parses and validates a COCO instances json; returns {'categories': [(id, name)], 'images': [...],
  'anns_by_image': {image_id: [ann, ...]}}. Raises CocoFormatError naming the file / annotation id."""
  try:
    data = json.loads(files.read_text(ann_path))
  except FileNotFoundError:
    raise CocoFormatError(f"annotation file not found: {ann_path}") from None
  except json.JSONDecodeError as e:
    raise CocoFormatError(f"{ann_path}: not valid json ({e})") from None
  for key in ("images", "annotations", "categories"):
    if key not in data:
      raise CocoFormatError(f"{ann_path}: missing top-level key '{key}'")
  categories = sorted((int(c["id"]), str(c["name"])) for c in data["categories"])
  cat_ids = [c for c, _ in categories]
  if len(set(cat_ids)) != len(cat_ids) or (cat_ids and cat_ids[0] < 1):
    raise CocoFormatError(f"{ann_path}: category ids must be unique and >= 1 (0 is background), got {cat_ids}")
  images = sorted(data["images"], key=lambda im: im["id"])
  image_ids = [im["id"] for im in images]
  if len(set(image_ids)) != len(image_ids):
    raise CocoFormatError(f"{ann_path}: duplicate image ids")
  anns_by_image = {i: [] for i in image_ids}
  known_cats = set(cat_ids)
  for ann in data["annotations"]:
    ann_id = ann.get("id")
    if ann.get("image_id") not in anns_by_image:
      raise CocoFormatError(f"{ann_path}: annotation id {ann_id} refers to unknown image id {ann.get('image_id')}")
    if ann.get("category_id") not in known_cats:
      raise CocoFormatError(f"{ann_path}: annotation id {ann_id} has unknown category id "
                            f"{ann.get('category_id')} (categories: {cat_ids})")
    bbox = ann.get("bbox")
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
      raise CocoFormatError(f"{ann_path}: annotation id {ann_id} has an invalid bbox {bbox!r} "
                            "(want 4 finite numbers x, y, w, h)")
    anns_by_image[ann["image_id"]].append(ann)
  return {"categories": categories, "images": images, "anns_by_image": anns_by_image}


def encoded_rgb_image(path: str, json_size: Optional[tuple] = None) -> bytes:
  """Bytes `tf.io.decode_image(channels=3)` decodes to PIL's RGB pixels; checks the stored size (h, w)."""
  try:
    with files.open_file(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise CocoFormatError(f"image listed in the annotations is missing: {path}") from None
  try:
    with PIL.Image.open(io.BytesIO(data)) as im:
      im.load()
      size = (im.height, im.width)
      if json_size is not None and tuple(json_size) != size:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        hint = (f"; it has EXIF orientation {orientation}, but COCO boxes refer to the stored pixels "
                "(EXIF is not applied)") if orientation != 1 else ""
        raise CocoFormatError(f"{path}: stored image is {size[1]}x{size[0]} (WxH) but the json says "
                              f"{json_size[1]}x{json_size[0]}{hint}")
      if im.format == "JPEG" and im.mode in ("RGB", "L"):
        return data
      out = io.BytesIO()
      im.convert("RGB").save(out, format="PNG")
      return out.getvalue()
  except (OSError, SyntaxError, ValueError) as e:
    if isinstance(e, CocoFormatError):
      raise
    raise CocoFormatError(f"{path}: cannot decode image ({e})") from None


class CocoFolder(tfds.core.GeneratorBasedBuilder):
  """COCO-format folder; construct with `CocoFolder(config=folder_config(...), data_dir=...)`."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      description="A COCO-format detection folder (images + instances json).",
      features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(),
        "image/id": np.int64,
        "image/filename": tfds.features.Text(),
        "objects": tfds.features.Sequence({
          "id": np.int64,
          "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
          "category_id": np.int64,
          "is_crowd": np.bool_,
        }),
      }),
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    parsed = {split: (load_annotations(ann), ann, images) for split, ann, images in self.builder_config.splits}
    (first_split, (first, first_ann, _)), *others = parsed.items()
    for split, (anns, ann, _) in others:
      if anns["categories"] != first["categories"]:
        raise CocoFormatError(f"categories differ between {first_ann} and {ann}")
    self.info.metadata["categories"] = [list(c) for c in first["categories"]]
    for _, (anns, ann, images_dir) in parsed.items():
      for im in anns["images"]:
        path = os.path.join(images_dir, im["file_name"])
        if not files.isfile(path):
          raise CocoFormatError(f"image listed in {ann} is missing: {path} (image id {im['id']})")
    return {split: self._generate_examples(anns, images_dir) for split, (anns, _, images_dir) in parsed.items()}

  def _generate_examples(self, anns, images_dir):
    for im in anns["images"]:
      json_size = (im["height"], im["width"]) if "height" in im and "width" in im else None
      objects = anns["anns_by_image"][im["id"]]
      yield im["id"], {
        "image": encoded_rgb_image(os.path.join(images_dir, im["file_name"]), json_size),
        "image/id": im["id"],
        "image/filename": im["file_name"],
        "objects": {
          "id": np.asarray([a["id"] for a in objects], np.int64),
          "bbox": np.asarray([a["bbox"] for a in objects], np.float32).reshape(-1, 4),
          "category_id": np.asarray([a["category_id"] for a in objects], np.int64),
          "is_crowd": np.asarray([bool(a.get("iscrowd", 0)) for a in objects], np.bool_),
        },
      }
