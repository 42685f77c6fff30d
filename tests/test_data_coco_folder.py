"""COCO-format folder builder: torchvision's cleaning rules, label spaces, image conversion and bad-data errors."""

import json
import os

import numpy as np
import PIL.Image
import pytest

from ssdlite_jax.data import coco_folder, config as data_config, pipeline

pytestmark = pytest.mark.tf  # imports TensorFlow

H, W = 80, 100
CATEGORIES = [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}, {"id": 12, "name": "c"}]


def write_folder(root, images, annotations, categories=CATEGORIES, split="train"):
  """Writes root/<split>/<file> for each (image dict, PIL image) and root/annotations/instances_<split>.json."""
  os.makedirs(os.path.join(root, split), exist_ok=True)
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  for info, pil in images:
    if pil is not None:
      kwargs = {"exif": pil.info["exif"]} if "exif" in pil.info else {}
      pil.save(os.path.join(root, split, info["file_name"]), **kwargs)
  with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
    json.dump({"images": [i for i, _ in images], "annotations": annotations, "categories": categories}, f)
  return root


def _image(image_id, name, pil, h=H, w=W):
  return {"id": image_id, "file_name": name, "height": h, "width": w}, pil


def _ann(ann_id, image_id, cat, bbox, crowd=0):
  return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": crowd,
          "area": bbox[2] * bbox[3]}


CMYK = PIL.Image.new("CMYK", (W, H), (40, 90, 10, 30))
IMAGES = [
  _image(1, "rgb.jpg", PIL.Image.new("RGB", (W, H), (200, 40, 90))),
  _image(2, "gray.jpg", PIL.Image.new("L", (W, H), 77)),
  _image(3, "rgba.png", PIL.Image.new("RGBA", (W, H), (10, 200, 30, 128))),
  _image(4, "cmyk.jpg", CMYK),
]
ANNOTATIONS = [
  _ann(11, 1, 3, [10, 20, 30, 40]),          # -> [10, 20, 40, 60]
  _ann(12, 1, 7, [0, 0, 50, 50], crowd=1),    # crowd: dropped
  _ann(13, 1, 12, [90, 70, 20, 20]),          # clamped -> [90, 70, 100, 80]
  _ann(14, 1, 3, [-5, 10, 4, 10]),            # clamped to x2 = x1 = 0: dropped
  _ann(15, 1, 7, [50, 50, 0, 10]),            # zero width: dropped
  _ann(21, 2, 7, [0, 0, 30, 30], crowd=1),    # only a crowd box: kept for training, with no boxes
  _ann(41, 4, 12, [5, 5, 1, 5]),              # width <= 1: image skipped for training, box kept for eval
]                                            # image 3 has no annotation: skipped for training


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("folder"))
  write_folder(root, IMAGES, ANNOTATIONS, split="train")
  write_folder(root, IMAGES, ANNOTATIONS, split="val")
  return root


def _cfg(folder, tmp, **kw):
  cfg = data_config.default_data_config()
  cfg.update(name="coco_folder", data_dir=str(tmp), root=folder, train_ann="annotations/instances_train.json",
             val_ann="annotations/instances_val.json", augmentation="none", num_parallel_calls=1, **kw)
  return cfg


@pytest.fixture(scope="module")
def cfg(folder, tmp_path_factory):
  return _cfg(folder, tmp_path_factory.mktemp("tfds"))


def test_label_space_contiguous_and_category_id(cfg):
  info = pipeline.open_source(cfg).info
  assert info.num_classes == 4
  assert info.class_names == ("__background__", "a", "b", "c")
  np.testing.assert_array_equal(info.label_to_category_id, [-1, 3, 7, 12])
  assert info.gt_json.endswith("instances_val.json")
  cfg2 = cfg.copy_and_resolve_references()
  cfg2.label_mode = "category_id"
  raw = pipeline.open_source(cfg2).info
  assert raw.num_classes == 13 and raw.class_names[12] == "c" and raw.class_names[4] == "N/A"
  assert raw.label_to_category_id[12] == 12 and raw.label_to_category_id[0] == -1


def test_train_cleaning_and_filter(cfg):
  source = pipeline.open_source(cfg)
  it = pipeline.create_train_dataset(source, global_batch_size=2, image_size=(320, 320), seed=0,
                                     process_index=0, process_count=1)
  batch = next(it)
  assert sorted(batch["image_id"]) == [1, 2]  # 3 (no annotation) and 4 (only a <= 1 px box) are skipped
  by_id = {int(i): k for k, i in enumerate(batch["image_id"])}
  k = by_id[1]
  assert batch["mask"][k].sum() == 2
  np.testing.assert_allclose(batch["boxes"][k][:2], [[32, 80, 128, 240], [288, 280, 320, 320]], atol=1e-4)
  np.testing.assert_array_equal(batch["labels"][k][:2], [1, 3])
  assert not batch["mask"][by_id[2]].any()
  np.testing.assert_array_equal(batch["orig_size"][k], [H, W])


def test_eval_keeps_every_image_and_converts_images(cfg):
  source = pipeline.open_source(cfg)
  batches, num = pipeline.create_eval_dataset(source, global_batch_size=3, image_size=(32, 32),
                                              process_index=0, process_count=1)
  assert num == 2
  out = list(batches)
  ids = np.concatenate([b["image_id"] for b in out])
  valid = np.concatenate([b["valid"] for b in out])
  assert sorted(ids[valid]) == [1, 2, 3, 4] and list(ids[~valid]) == [-1, -1]
  images = {int(i): im for b in out for i, im in zip(b["image_id"], b["image"])}
  boxes = {int(i): (bx, m) for b in out for i, bx, m in zip(b["image_id"], b["boxes"], b["mask"])}
  np.testing.assert_allclose(boxes[4][0][boxes[4][1]], [[1.6, 2.0, 1.92, 4.0]], atol=1e-5)
  expected = {1: (200, 40, 90), 2: (77, 77, 77), 3: (10, 200, 30), 4: CMYK.convert("RGB").getpixel((0, 0))}
  for image_id, rgb in expected.items():
    np.testing.assert_allclose(images[image_id].mean(axis=(0, 1)) * 255, rgb, atol=2.5)


def test_a_folder_in_a_bucket_gives_the_same_data(folder, cfg, gcs, tmp_path):
  """The same folder copied (by gcsfs) to gs://test-bucket on the GCS emulator and prepared from there: the same
  label space, the ground-truth json read from the bucket, the same eval examples (pixels, boxes, labels)."""
  import fsspec
  fsspec.filesystem("gs").put(folder + "/", "test-bucket/coco/", recursive=True)
  local, remote = pipeline.open_source(cfg), pipeline.open_source(_cfg("gs://test-bucket/coco", tmp_path))
  assert remote.info.class_names == local.info.class_names
  np.testing.assert_array_equal(remote.info.label_to_category_id, local.info.label_to_category_id)
  assert remote.info.gt_json == "gs://test-bucket/coco/annotations/instances_val.json"
  got, want = (pipeline.eval_examples(s, len(IMAGES)) for s in (remote, local))
  assert [ex["image_id"] for ex in got] == [ex["image_id"] for ex in want] and len(got) == len(IMAGES)
  for a, b in zip(got, want):
    for key in ("image", "boxes", "labels"):
      np.testing.assert_array_equal(a[key], b[key])


def _prepare(root, tmp, **kw):
  config = coco_folder.folder_config(root, "annotations/instances_train.json", **kw)
  coco_folder.CocoFolder(config=config, data_dir=str(tmp)).download_and_prepare()


def _bad(tmp_path, images, annotations, match):
  root = write_folder(str(tmp_path / "src"), images, annotations)
  with pytest.raises(coco_folder.CocoFormatError, match=match):
    _prepare(root, tmp_path / "tfds")


def test_missing_image_names_file(tmp_path):
  _bad(tmp_path, [_image(1, "gone.jpg", None)], [], r"missing: .*gone\.jpg")


def test_truncated_image_names_file(tmp_path):
  root = write_folder(str(tmp_path / "src"), [_image(1, "cut.jpg", PIL.Image.effect_noise((W, H), 50))], [])
  path = os.path.join(root, "train", "cut.jpg")
  data = open(path, "rb").read()
  open(path, "wb").write(data[: len(data) // 2])
  with pytest.raises(coco_folder.CocoFormatError, match=r"cut\.jpg: cannot decode"):
    _prepare(root, tmp_path / "tfds")


def test_not_an_image_names_file(tmp_path):
  root = write_folder(str(tmp_path / "src"), [_image(1, "text.jpg", None)], [])
  open(os.path.join(root, "train", "text.jpg"), "w").write("hello")
  with pytest.raises(coco_folder.CocoFormatError, match=r"text\.jpg: cannot decode"):
    _prepare(root, tmp_path / "tfds")


def test_unknown_category_names_annotation(tmp_path):
  _bad(tmp_path, [_image(1, "a.jpg", PIL.Image.new("RGB", (W, H)))], [_ann(17, 1, 5, [1, 1, 5, 5])],
       r"annotation id 17 has unknown category id 5")


def test_unknown_image_names_annotation(tmp_path):
  _bad(tmp_path, [_image(1, "a.jpg", PIL.Image.new("RGB", (W, H)))], [_ann(18, 9, 3, [1, 1, 5, 5])],
       r"annotation id 18 refers to unknown image id 9")


def test_non_finite_box_names_annotation(tmp_path):
  _bad(tmp_path, [_image(1, "a.jpg", PIL.Image.new("RGB", (W, H)))],
       [{**_ann(19, 1, 3, [1, 1, 5, 5]), "bbox": [1, 1, None, 5]}], r"annotation id 19 has an invalid bbox")


def test_exif_rotated_size_mismatch_is_explained(tmp_path):
  pil = PIL.Image.new("RGB", (W, H))
  exif = pil.getexif()
  exif[0x0112] = 6
  pil.info["exif"] = exif.tobytes()
  _bad(tmp_path, [_image(1, "rot.jpg", pil, h=W, w=H)], [], r"rot\.jpg: stored image is 100x80 .*EXIF orientation 6")


def test_exif_orientation_is_ignored_when_sizes_agree(tmp_path):
  pil = PIL.Image.new("RGB", (W, H), (0, 0, 255))
  exif = pil.getexif()
  exif[0x0112] = 6
  pil.info["exif"] = exif.tobytes()
  root = write_folder(str(tmp_path / "src"), [_image(1, "rot.jpg", pil)], [_ann(1, 1, 3, [1, 2, 30, 40])])
  _prepare(root, tmp_path / "tfds")  # stored pixel frame, as torchvision (PIL without exif_transpose)
