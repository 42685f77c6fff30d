"""Pascal VOC trees, converted to COCO instances jsons that the COCO-folder builder prepares.

A tree as VOCdevkit/VOC2012 (or VOC2007, or your own in that layout):
  Annotations/<id>.xml, JPEGImages/<filename of the xml, default <id>.jpg>, ImageSets/Main/<set>.txt (one id
  per line; the sets are data.voc_train_set / data.voc_val_set).
Classes are the sorted object names found in the two sets (for VOC: the usual 20, alphabetical); the k-th is
category id k + 1. A box (xmin, ymin, xmax, ymax) in VOC's 1-based pixel indices becomes the pixel frame
[xmin - 1, ymin - 1, xmax, ymax] (as detectron2 reads VOC). `difficult` objects become COCO crowd objects:
kept out of training (the pipeline drops crowd boxes, as torchvision) and ignored in evaluation (COCOeval
neither counts them as missed nor counts detections on them as false; its overlap for crowd objects is the
intersection over the detection's area, where VOC's devkit uses IoU).
Errors name the file: a missing or malformed xml, a missing tag, a box with xmax < xmin or ymax < ymin.
"""

import os
import xml.etree.ElementTree as ET

from ssdlite_jax.data import coco_folder


class VocFormatError(coco_folder.CocoFormatError):
  """A VOC tree that cannot be converted unambiguously."""


def read_set(root: str, image_set: str):
  """The image ids listed in root/ImageSets/Main/<image_set>.txt."""
  path = os.path.join(root, "ImageSets", "Main", f"{image_set}.txt")
  try:
    with open(path) as f:
      return [line.split()[0] for line in f if line.strip()]
  except FileNotFoundError:
    raise VocFormatError(f"image set not found: {path}") from None


def _text(node, tag, path, where):
  child = node.find(tag)
  if child is None or child.text is None or not child.text.strip():
    raise VocFormatError(f"{path}: {where} has no <{tag}>")
  return child.text.strip()


def read_annotation(path: str, image_id: str) -> dict:
  """{'file_name', 'width', 'height', 'objects': [(name, difficult, (xmin, ymin, xmax, ymax))]} of one xml."""
  try:
    tree = ET.parse(path).getroot()
  except FileNotFoundError:
    raise VocFormatError(f"annotation not found: {path}") from None
  except ET.ParseError as e:
    raise VocFormatError(f"{path}: malformed xml ({e})") from None
  size = tree.find("size")
  if size is None:
    raise VocFormatError(f"{path}: no <size>")
  try:
    width, height = int(_text(size, "width", path, "<size>")), int(_text(size, "height", path, "<size>"))
    objects = []
    for k, obj in enumerate(tree.findall("object")):
      where = f"object {k}"
      box = obj.find("bndbox")
      if box is None:
        raise VocFormatError(f"{path}: {where} has no <bndbox>")
      xyxy = tuple(float(_text(box, t, path, where)) for t in ("xmin", "ymin", "xmax", "ymax"))
      if xyxy[2] < xyxy[0] or xyxy[3] < xyxy[1]:
        raise VocFormatError(f"{path}: {where} has a box with xmax < xmin or ymax < ymin: {xyxy}")
      difficult = obj.find("difficult")
      objects.append((_text(obj, "name", path, where),
                      difficult is not None and (difficult.text or "0").strip() == "1", xyxy))
  except ValueError as e:
    if isinstance(e, VocFormatError):
      raise
    raise VocFormatError(f"{path}: a size or coordinate is not a number ({e})") from None
  name = tree.find("filename")
  file_name = name.text.strip() if name is not None and name.text else f"{image_id}.jpg"
  return {"file_name": file_name, "width": width, "height": height, "objects": objects}


def convert(root: str, train_set: str, val_set: str, out_dir: str):
  """Converts root's two image sets to out_dir/<name>/instances_<image set>.json.

  Returns (images folder, {split: json path}) with split in ('train', 'validation').
  """
  root = os.path.abspath(os.path.expanduser(root))
  sets = {"train": (train_set, {}), "validation": (val_set, {})}
  for _, (image_set, parsed) in sets.items():
    for image_id in read_set(root, image_set):
      parsed[image_id] = read_annotation(os.path.join(root, "Annotations", f"{image_id}.xml"), image_id)
  names = sorted({o[0] for _, parsed in sets.values() for a in parsed.values() for o in a["objects"]})
  categories = [{"id": k + 1, "name": n} for k, n in enumerate(names)]
  category = {n: k + 1 for k, n in enumerate(names)}
  out = coco_folder.converted_dir(out_dir, "voc", root, f"{root}|{train_set}|{val_set}")
  jsons = {}
  for split, (image_set, parsed) in sets.items():
    images, annotations = [], []
    for image_id, a in parsed.items():
      number = len(images) + 1
      images.append({"id": number, "file_name": a["file_name"], "width": a["width"], "height": a["height"]})
      for name, difficult, (x1, y1, x2, y2) in a["objects"]:
        xywh = [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1]
        annotations.append({"id": len(annotations) + 1, "image_id": number, "category_id": category[name],
                            "bbox": xywh, "area": xywh[2] * xywh[3], "iscrowd": int(difficult)})
    if not images:
      raise VocFormatError(f"{root}: image set '{image_set}' is empty")
    jsons[split] = coco_folder.write_instances_json(os.path.join(out, f"instances_{image_set}.json"), images,
                                                    annotations, categories)
  return os.path.join(root, "JPEGImages"), jsons
