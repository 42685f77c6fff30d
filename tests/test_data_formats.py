"""YOLO and Pascal VOC datasets: converted to COCO jsons (hand-computed boxes), trained and evaluated through the
COCO-folder pipeline, and bad data reported with the file and line."""

import json
import os

import numpy as np
import PIL.Image
import pytest
import yaml

from ssdlite_jax import evaluation
from ssdlite_jax.data import coco_folder, config as data_config, pipeline, voc, yolo

pytestmark = pytest.mark.tf  # imports TensorFlow (TFDS)

H, W = 60, 80


def _save(path, h=H, w=W, exif=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im = PIL.Image.new("RGB", (w, h), (120, 30, 200))
  im.save(path, **({"exif": exif} if exif is not None else {}))


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def yolo_dataset(root, names=("cat", "dog"), train_labels=None, val_list=True):
  """root/data.yaml, images/{train,val}, labels/{train,val}; val given as a txt list when val_list."""
  train_labels = train_labels if train_labels is not None else {
    "a": "0 0.5 0.5 0.25 0.5\n1 0.125 0.25 0.25 0.5\n",       # -> [30, 15, 20, 30], [0, 0, 20, 30]
    "b": "\n1 0.1 0.1 0.3 0.1 0.3 0.4 0.1 0.4\n",             # polygon -> its box [8, 6, 16, 18]
    "c": "0 0.05 0.9 0.2 0.4\n",                              # past the left and bottom edges: clipped
  }
  for stem, text in train_labels.items():
    _save(f"{root}/images/train/{stem}.jpg")
    _write(f"{root}/labels/train/{stem}.txt", text)
  _save(f"{root}/images/train/background.jpg")               # no label file: a background image
  _save(f"{root}/images/val/v.png", h=40, w=40)
  _write(f"{root}/labels/val/v.txt", "0 0.5 0.5 0.5 0.5\n")   # -> [10, 10, 20, 20]
  if val_list:
    _write(f"{root}/val.txt", "./images/val/v.png\n")
  spec = {"path": ".", "train": "images/train", "val": "val.txt" if val_list else "images/val",
          "names": dict(enumerate(names))}
  _write(f"{root}/data.yaml", yaml.safe_dump(spec))
  return f"{root}/data.yaml"


def _cfg(tmp, **kw):
  cfg = data_config.default_data_config()
  cfg.update(data_dir=str(tmp / "tfds"), augmentation="none", num_parallel_calls=1, **kw)
  return cfg


def _boxes(json_path):
  with open(json_path) as f:
    data = json.load(f)
  files = {im["id"]: im["file_name"] for im in data["images"]}
  return data, sorted((files[a["image_id"]], a["category_id"], a["bbox"], a["iscrowd"]) for a in data["annotations"])


def test_yolo_converts_to_pixel_boxes(tmp_path):
  root, jsons = yolo.convert(yolo_dataset(str(tmp_path / "ds")), str(tmp_path / "out"))
  data, boxes = _boxes(jsons["train"])
  assert data["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
  assert sorted(im["file_name"] for im in data["images"]) == [
    "images/train/a.jpg", "images/train/b.jpg", "images/train/background.jpg", "images/train/c.jpg"]
  assert boxes == [("images/train/a.jpg", 1, [30.0, 15.0, 20.0, 30.0], 0),
                   ("images/train/a.jpg", 2, [0.0, 0.0, 20.0, 30.0], 0),
                   ("images/train/b.jpg", 2, pytest.approx([8.0, 6.0, 16.0, 18.0]), 0),
                   ("images/train/c.jpg", 1, pytest.approx([0.0, 42.0, 12.0, 18.0]), 0)]   # x -4..12, y 42..66
  assert _boxes(jsons["validation"])[1] == [("images/val/v.png", 1, [10.0, 10.0, 20.0, 20.0], 0)]
  assert root == str(tmp_path / "ds")
  assert coco_folder.split_summary("train", data["images"], data["annotations"], data["categories"]) == (
    "train: 4 images (1 without objects), 4 boxes: cat 2, dog 2")
  mtime = os.stat(jsons["train"]).st_mtime_ns
  yolo.convert(f"{root}/data.yaml", str(tmp_path / "out"))   # unchanged data: the json is not rewritten
  assert os.stat(jsons["train"]).st_mtime_ns == mtime


def test_yolo_trains_and_evaluates_through_the_folder_pipeline(tmp_path):
  cfg = _cfg(tmp_path, name="yolo", yaml=yolo_dataset(str(tmp_path / "ds"), val_list=False))
  source = pipeline.open_source(cfg)
  assert source.info.class_names == ("__background__", "cat", "dog")
  batch = next(pipeline.create_train_dataset(source, global_batch_size=3, image_size=(60, 80), seed=0,
                                             process_index=0, process_count=1))
  got = {int(i): (b[m], lab[m]) for i, b, lab, m in zip(batch["image_id"], batch["boxes"], batch["labels"],
                                                         batch["mask"])}
  # images 1, 2, 4 are a, b, c.jpg (sorted); 3, the background image, has no box and is not trained on
  np.testing.assert_allclose(got[1][0], [[30, 15, 50, 45], [0, 0, 20, 30]], atol=1e-4)
  np.testing.assert_array_equal(got[1][1], [1, 2])
  np.testing.assert_allclose(got[2][0], [[8, 6, 24, 24]], atol=1e-4)
  np.testing.assert_allclose(got[4][0], [[0, 42, 12, 60]], atol=1e-4)   # image 3 is the background one
  results = [{"image_id": 1, "category_id": 1, "bbox": [10.0, 10.0, 20.0, 20.0], "score": 0.9}]
  assert evaluation.coco_metrics(results, source.info.gt_json)["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("labels, match", [
  ({"a": "0 0.5 0.5 0.2 0.2\n2 0.5 0.5 0.2 0.2\n"}, r"a\.txt:2: class 2 is outside names \(0\.\.1\)"),
  ({"a": "0 0.5 1.5 0.2 0.2\n"}, r"a\.txt:1: coordinates .* not all in \[0, 1\]"),
  ({"a": "1 0.5 0.5 0 0.2\n"}, r"a\.txt:1: box of zero size"),
  ({"a": "0 0.5 0.5 0.2\n"}, r"a\.txt:1: malformed line"),
  ({"a": "cat 0.5 0.5 0.2 0.2\n"}, r"a\.txt:1: malformed line"),
])
def test_yolo_bad_labels_name_file_and_line(tmp_path, labels, match):
  with pytest.raises(yolo.YoloFormatError, match=match):
    yolo.convert(yolo_dataset(str(tmp_path / "ds"), train_labels=labels), str(tmp_path / "out"))


def test_yolo_label_without_image_and_bad_yaml(tmp_path):
  path = yolo_dataset(str(tmp_path / "ds"))
  _write(str(tmp_path / "ds/labels/train/classes.txt"), "cat\ndog\n")   # labelImg's class list: not a label file
  yolo.convert(path, str(tmp_path / "out"))
  _write(str(tmp_path / "ds/labels/train/orphan.txt"), "0 0.5 0.5 0.1 0.1\n")
  with pytest.raises(yolo.YoloFormatError, match=r"label file without an image: .*orphan\.txt"):
    yolo.convert(path, str(tmp_path / "out"))
  _write(str(tmp_path / "bad.yaml"), "train: images\nnames: {0: a, 2: b}\n")
  with pytest.raises(yolo.YoloFormatError, match=r"bad\.yaml: 'names' keys must be 0\.\.1"):
    yolo.convert(str(tmp_path / "bad.yaml"), str(tmp_path / "out"))
  with pytest.raises(ValueError, match="needs data.yaml"):
    pipeline.open_source(_cfg(tmp_path, name="yolo"))


def test_yolo_rotated_exif_is_an_error(tmp_path):
  path = yolo_dataset(str(tmp_path / "ds"))
  exif = PIL.Image.Exif()
  exif[0x0112] = 6
  _save(str(tmp_path / "ds/images/train/a.jpg"), exif=exif)
  with pytest.raises(yolo.YoloFormatError, match=r"a\.jpg: EXIF orientation 6"):
    yolo.convert(path, str(tmp_path / "out"))


def _voc_xml(name, objects, w=W, h=H):
  objs = "".join(
    f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
    f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, d, b in objects)
  return (f"<annotation><filename>{name}.jpg</filename><size><width>{w}</width><height>{h}</height>"
          f"<depth>3</depth></size>{objs}</annotation>")


def voc_tree(root, extra=None):
  """root/{Annotations,JPEGImages,ImageSets/Main}: train 0001 (dog, difficult cat), 0002 (person); val 0003 (cat,
  difficult cat)."""
  annotations = {
    "0001": [("dog", 0, (11, 21, 40, 50)), ("cat", 1, (1, 1, 10, 10))],
    "0002": [("person", 0, (5, 5, 80, 60))],
    "0003": [("cat", 0, (31, 11, 50, 30)), ("cat", 1, (1, 31, 20, 60))],
    **(extra or {}),
  }
  for image_id, objects in annotations.items():
    _write(f"{root}/Annotations/{image_id}.xml", objects if isinstance(objects, str) else _voc_xml(image_id, objects))
    _save(f"{root}/JPEGImages/{image_id}.jpg")
  _write(f"{root}/ImageSets/Main/train.txt", "0001\n0002\n" + "".join(f"{k}\n" for k in (extra or {})))
  _write(f"{root}/ImageSets/Main/val.txt", "0003\n")
  return root


def test_voc_converts_difficult_to_crowd(tmp_path):
  images, jsons = voc.convert(voc_tree(str(tmp_path / "VOC2012")), "train", "val", str(tmp_path / "out"))
  assert images == str(tmp_path / "VOC2012" / "JPEGImages")
  data, boxes = _boxes(jsons["train"])
  assert [c["name"] for c in data["categories"]] == ["cat", "dog", "person"]
  assert boxes == [("0001.jpg", 1, [0.0, 0.0, 10.0, 10.0], 1), ("0001.jpg", 2, [10.0, 20.0, 30.0, 30.0], 0),
                   ("0002.jpg", 3, [4.0, 4.0, 76.0, 56.0], 0)]
  with pytest.raises(voc.VocFormatError, match=r"image set not found: .*Main/test\.txt"):
    voc.convert(str(tmp_path / "VOC2012"), "train", "test", str(tmp_path / "out"))


def test_voc_trains_without_difficult_and_evaluation_ignores_them(tmp_path):
  source = pipeline.open_source(_cfg(tmp_path, name="voc", root=voc_tree(str(tmp_path / "VOC2012"))))
  batch = next(pipeline.create_train_dataset(source, global_batch_size=2, image_size=(60, 80), seed=0,
                                             process_index=0, process_count=1))
  got = {int(i): b[m] for i, b, m in zip(batch["image_id"], batch["boxes"], batch["mask"])}
  np.testing.assert_allclose(got[1], [[10, 20, 40, 50]], atol=1e-4)   # the difficult cat is not trained on
  cat = [{"image_id": 1, "category_id": 1, "bbox": [30.0, 10.0, 20.0, 20.0], "score": 0.8}]
  on_difficult = [{"image_id": 1, "category_id": 1, "bbox": [0.0, 30.0, 20.0, 30.0], "score": 0.9}]
  # the difficult cat is not a miss (recall 1 without it), nor is the higher-scored detection on it a false one
  assert evaluation.coco_metrics(cat, source.info.gt_json)["AP"] == pytest.approx(1.0)
  result = evaluation.coco_evaluation(cat + on_difficult, source.info.gt_json)
  assert result.metrics["AP"] == pytest.approx(1.0)
  assert [(r["name"], r["AP"]) for r in result.per_class] == [("cat", pytest.approx(1.0)), ("dog", -1.0),
                                                               ("person", -1.0)]


@pytest.mark.parametrize("xml, match", [
  ("<annotation><size><width>80</width>", r"0009\.xml: malformed xml"),
  (_voc_xml("0009", [("cat", 0, (5, 5, 3, 9))]), r"0009\.xml: object 0 has a box with xmax < xmin"),
  ("<annotation><size><width>80</width><height>60</height></size><object><name>cat</name><bndbox><xmin>1</xmin>"
   "<ymin>1</ymin><xmax>5</xmax></bndbox></object></annotation>", r"0009\.xml: object 0 has no <ymax>"),
  ("<annotation><object/></annotation>", r"0009\.xml: no <size>"),
])
def test_voc_bad_annotations_name_the_file(tmp_path, xml, match):
  root = voc_tree(str(tmp_path / "VOC2012"), extra={"0009": xml})
  with pytest.raises(voc.VocFormatError, match=match):
    voc.convert(root, "train", "val", str(tmp_path / "out"))
