"""Ultralytics YOLO datasets, converted to COCO instances jsons that the COCO-folder builder prepares.

A dataset YAML (`data.yaml`) as Ultralytics reads it:
  path:  the dataset root (relative: to the YAML's folder; default: the YAML's folder)
  train, val: relative to `path`; each a folder of images (searched recursively), a .txt list of image paths
         (relative lines are relative to the list's folder, as Ultralytics' './' lines), or a list of those
  names: ['cat', 'dog'] or {0: 'cat', 1: 'dog'}
Each image `.../images/.../x.jpg` has its labels in `.../labels/.../x.txt`, one object per line,
`class cx cy w h` normalised to [0, 1] (a polygon `class x1 y1 x2 y2 x3 y3 ...` becomes its bounding box, as
Ultralytics does). Class k becomes category id k + 1 named names[k].

An image without a label file, or with an empty one, is a background image: in the json (so evaluated) but,
as torchvision's rule for images without a box, not trained on; train.py's start-up summary counts them.
Boxes are clipped to the image (a centre near the border with a wide box reaches past it). A labels folder's
`classes.txt` (labelImg's class list) is not a label file.
Errors name the file and line: a class outside `names`, a value outside [0, 1], a box of zero size, a
malformed line, a label file without an image (folder splits), an image whose EXIF orientation would move
its boxes (YOLO labels refer to the upright image, the pipeline reads the stored pixels: as torchvision).
"""

import os

import PIL.Image
import yaml

from ssdlite_jax.data import coco_folder

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
_EXIF_ORIENTATION = 0x0112


class YoloFormatError(coco_folder.CocoFormatError):
  """A YOLO dataset that cannot be converted unambiguously."""


def read_yaml(path: str) -> dict:
  """{'root', 'names': [str], 'train': [entries], 'val': [entries]} of a dataset YAML, paths absolute."""
  try:
    with open(path) as f:
      data = yaml.safe_load(f)
  except FileNotFoundError:
    raise YoloFormatError(f"dataset YAML not found: {path}") from None
  except yaml.YAMLError as e:
    raise YoloFormatError(f"{path}: not valid YAML ({e})") from None
  if not isinstance(data, dict):
    raise YoloFormatError(f"{path}: want a mapping with path/train/val/names, got {type(data).__name__}")
  names = data.get("names")
  if isinstance(names, dict):
    if sorted(names) != list(range(len(names))):
      raise YoloFormatError(f"{path}: 'names' keys must be 0..{len(names) - 1}, got {sorted(names)}")
    names = [names[k] for k in range(len(names))]
  if not isinstance(names, list) or not names:
    raise YoloFormatError(f"{path}: 'names' must be a non-empty list or a dict {{index: name}}, got {names!r}")
  here = os.path.dirname(os.path.abspath(path))
  root = os.path.normpath(os.path.join(here, str(data.get("path") or ".")))
  splits = {}
  for split in ("train", "val"):
    entries = data.get(split)
    if entries is None:
      continue
    entries = entries if isinstance(entries, list) else [entries]
    splits[split] = [os.path.normpath(os.path.join(root, str(e))) for e in entries]
  if not splits:
    raise YoloFormatError(f"{path}: names neither 'train' nor 'val'")
  return {"root": root, "names": [str(n) for n in names], **splits}


def label_path(image_path: str) -> str:
  """Ultralytics' rule: the last '/images/' of the path becomes '/labels/', the suffix '.txt'."""
  images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
  return os.path.splitext(labels.join(image_path.rsplit(images, 1)))[0] + ".txt"


def _list_images(entry: str, yaml_path: str):
  """(image paths, the labels folder whose files must all have an image, or None) of one train/val entry."""
  if os.path.isdir(entry):
    found = sorted(os.path.join(d, f) for d, _, files in os.walk(entry) for f in files
                   if f.lower().endswith(IMAGE_SUFFIXES))
    labels_dir = os.path.dirname(label_path(os.path.join(entry, "x")))
    return found, labels_dir if labels_dir != entry else None
  if os.path.isfile(entry):
    here = os.path.dirname(entry)
    with open(entry) as f:
      lines = [line.strip() for line in f]
    return [os.path.normpath(os.path.join(here, line)) for line in lines if line], None
  raise YoloFormatError(f"{yaml_path}: {entry} is neither a folder of images nor a .txt list")


def _read_labels(path: str, num_classes: int, width: int, height: int):
  """[(class, [x, y, w, h] pixels)] of one label file; YoloFormatError naming path:line on bad lines."""
  objects = []
  with open(path) as f:
    lines = f.read().splitlines()
  for number, line in enumerate(lines, 1):
    fields = line.split()
    if not fields:
      continue
    where = f"{path}:{number}"
    try:
      cls, values = int(fields[0]), [float(v) for v in fields[1:]]
    except ValueError:
      raise YoloFormatError(f"{where}: malformed line {line!r} (want 'class cx cy w h')") from None
    if len(values) == 4:
      cx, cy, w, h = values
    elif len(values) >= 6 and len(values) % 2 == 0:   # polygon -> its bounding box
      xs, ys = values[0::2], values[1::2]
      cx, cy, w, h = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)
    else:
      raise YoloFormatError(f"{where}: malformed line {line!r} (want 'class cx cy w h' or a polygon)")
    if not 0 <= cls < num_classes:
      raise YoloFormatError(f"{where}: class {cls} is outside names (0..{num_classes - 1})")
    if not all(0.0 <= v <= 1.0 for v in values):
      raise YoloFormatError(f"{where}: coordinates {values} are not all in [0, 1] (normalised)")
    if w <= 0 or h <= 0:
      raise YoloFormatError(f"{where}: box of zero size (w={w:g}, h={h:g})")
    x1, y1 = max(cx - w / 2, 0.0) * width, max(cy - h / 2, 0.0) * height
    x2, y2 = min(cx + w / 2, 1.0) * width, min(cy + h / 2, 1.0) * height
    objects.append((cls, [x1, y1, x2 - x1, y2 - y1]))
  return objects


def _image_size(path: str):
  """(width, height) of the stored pixels; YoloFormatError if missing, undecodable or EXIF-rotated."""
  try:
    with PIL.Image.open(path) as im:
      orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
      size = im.size
  except FileNotFoundError:
    raise YoloFormatError(f"image not found: {path}") from None
  except (OSError, SyntaxError, ValueError) as e:
    raise YoloFormatError(f"{path}: cannot decode image ({e})") from None
  if orientation not in (0, 1):
    raise YoloFormatError(f"{path}: EXIF orientation {orientation}; its YOLO labels refer to the upright image but "
                          "the pipeline reads the stored pixels: save it upright (PIL.ImageOps.exif_transpose)")
  return size


def _convert_split(entries, names, root, yaml_path):
  """(images, annotations) COCO lists of one split; file names relative to root where inside it."""
  images, annotations, labelled = [], [], set()
  for entry in entries:
    paths, labels_dir = _list_images(entry, yaml_path)
    for path in paths:
      width, height = _image_size(path)
      image_id = len(images) + 1
      rel = os.path.relpath(path, root)
      images.append({"id": image_id, "file_name": path if rel.startswith("..") else rel,
                     "width": width, "height": height})
      labels = label_path(path)
      labelled.add(labels)
      if not os.path.isfile(labels):
        continue
      for cls, xywh in _read_labels(labels, len(names), width, height):
        annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cls + 1,
                            "bbox": xywh, "area": xywh[2] * xywh[3], "iscrowd": 0})
    if labels_dir and os.path.isdir(labels_dir):
      for d, _, files in os.walk(labels_dir):
        for f in sorted(files):
          if f.endswith(".txt") and f != "classes.txt" and os.path.join(d, f) not in labelled:
            raise YoloFormatError(f"label file without an image: {os.path.join(d, f)} (no image of that name "
                                  f"under {entry})")
  return images, annotations


def convert(yaml_path: str, out_dir: str):
  """Converts the dataset of `yaml_path` to out_dir/<name>/instances_{train,val}.json.

  Returns (root, {split: json path}) with split in ('train', 'validation'); images are root/<file_name>.
  """
  spec = read_yaml(yaml_path)
  root, names = spec["root"], spec["names"]
  categories = [{"id": k + 1, "name": n} for k, n in enumerate(names)]
  out = coco_folder.converted_dir(out_dir, "yolo", root, os.path.abspath(yaml_path))
  jsons = {}
  for split, tfds_split in (("train", "train"), ("val", "validation")):
    if split not in spec:
      continue
    images, annotations = _convert_split(spec[split], names, root, yaml_path)
    if not images:
      raise YoloFormatError(f"{yaml_path}: split '{split}' has no images ({', '.join(spec[split])})")
    jsons[tfds_split] = coco_folder.write_instances_json(os.path.join(out, f"instances_{split}.json"), images,
                                                         annotations, categories)
  return root, jsons
