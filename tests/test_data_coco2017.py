"""The real TFDS coco/2017 builder on a tiny fake download (original zip names), then the pipeline end to end."""

import io
import json
import zipfile

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import download_manager

from ssdlite_jax.data import coco_labels, config as data_config, pipeline
from ssdlite_jax.rcnn import transform

pytestmark = pytest.mark.tf  # imports TensorFlow

CATEGORIES = [{"id": i, "name": n, "supercategory": s} for i, n, s in coco_labels.COCO_CATEGORIES]


def _jpeg(h, w, seed):
  pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
  buf = io.BytesIO()
  PIL.Image.fromarray(pixels).save(buf, format="JPEG")
  return buf.getvalue()


def _images(zf, folder, specs):
  images = []
  for image_id, h, w in specs:
    name = f"{image_id:012d}.jpg"
    zf.writestr(f"{folder}/{name}", _jpeg(h, w, image_id))
    images.append({"id": image_id, "file_name": name, "height": h, "width": w})
  return images


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
  """The five original zips with 3 train, 2 val and 1 test image; all 80 categories listed."""
  d = tmp_path_factory.mktemp("coco_manual")
  specs = {"train2017": [(9, 48, 64), (25, 64, 40), (30, 32, 32)], "val2017": [(139, 40, 60), (285, 50, 50)],
           "test2017": [(1, 30, 30)]}
  infos = {}
  for folder, s in specs.items():
    with zipfile.ZipFile(d / f"{folder}.zip", "w") as zf:
      infos[folder] = _images(zf, folder, s)
  anns = {
    "train2017": [
      {"id": 1, "image_id": 9, "category_id": 90, "bbox": [4.5, 6.25, 20.0, 10.0], "area": 200.0, "iscrowd": 0},
      {"id": 2, "image_id": 9, "category_id": 13, "bbox": [30.0, 10.0, 34.0, 20.0], "area": 680.0, "iscrowd": 0},
      {"id": 3, "image_id": 25, "category_id": 1, "bbox": [0.0, 0.0, 10.0, 10.0], "area": 100.0, "iscrowd": 1},
    ],  # image 30 has no annotation
    "val2017": [
      {"id": 4, "image_id": 139, "category_id": 72, "bbox": [10.0, 5.0, 30.0, 20.0], "area": 600.5, "iscrowd": 0},
    ],
  }
  with zipfile.ZipFile(d / "annotations_trainval2017.zip", "w") as zf:
    for split in ("train2017", "val2017"):
      zf.writestr(f"annotations/instances_{split}.json",
                  json.dumps({"images": infos[split], "annotations": anns[split], "categories": CATEGORIES}))
  with zipfile.ZipFile(d / "image_info_test2017.zip", "w") as zf:
    zf.writestr("annotations/image_info_test2017.json",
                json.dumps({"images": infos["test2017"], "categories": CATEGORIES}))
  return str(d)


@pytest.fixture(scope="module")
def cfg(manual_dir, tmp_path_factory):
  cfg = data_config.default_data_config()
  cfg.update(name="coco/2017", data_dir=str(tmp_path_factory.mktemp("tfds")), manual_dir=manual_dir,
             augmentation="none", num_parallel_calls=1)
  # The fake zips cannot match TFDS's registered checksums of the real ones; everything else is the real path.
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(download_manager.DownloadManager, "_register_or_validate_checksums",
               lambda self, url, url_info, path: self._recorded_url_infos.__setitem__(url, url_info))
    pipeline.open_source(cfg)
  return cfg


def test_official_category_list():
  ids = [c[0] for c in coco_labels.COCO_CATEGORIES]
  assert len(ids) == 80 and ids == sorted(ids) and ids[-1] == 90
  assert sorted(set(range(1, 91)) - set(ids)) == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
  names = coco_labels.coco_class_names()
  assert len(names) == 91 and names[0] == "__background__" and names[12] == "N/A" and names[90] == "toothbrush"


def test_tfds_labels_map_to_official_category_ids(cfg):
  builder = tfds.builder("coco/2017", data_dir=cfg.data_dir)
  tfds_names = builder.info.features["objects"]["label"].names
  np.testing.assert_array_equal(coco_labels.category_ids_for_names(tfds_names),
                                [c[0] for c in coco_labels.COCO_CATEGORIES])
  info = pipeline.open_source(cfg).info
  assert info.num_classes == 91
  assert info.label_to_category_id[90] == 90 and info.label_to_category_id[12] == -1


def test_train_batches_carry_category_ids(cfg):
  source = pipeline.open_source(cfg)
  batch = next(pipeline.create_train_dataset(source, global_batch_size=2, image_size=(32, 32), seed=0,
                                             process_index=0, process_count=1))
  assert sorted(batch["image_id"]) == [9, 25]  # 30 has no annotation; 25 has only a crowd box
  k = list(batch["image_id"]).index(9)
  assert list(batch["labels"][k][batch["mask"][k]]) == [90, 13]
  # xywh (30, 10, 34, 20) -> xyxy (30, 10, 64, 30), scaled by 32/64 and 32/48.
  np.testing.assert_allclose(batch["boxes"][k][:2], [[2.25, 25 / 6, 12.25, 65 / 6], [15, 20 / 3, 32, 20]],
                             atol=1e-4)
  assert not batch["mask"][1 - k].any()


def test_eval_and_written_ground_truth(cfg):
  source = pipeline.open_source(cfg)
  batches, num = pipeline.create_eval_dataset(source, global_batch_size=4, image_size=(32, 32),
                                              process_index=0, process_count=1)
  (batch,) = list(batches)
  assert num == 1 and sorted(batch["image_id"][batch["valid"]]) == [139, 285]
  k = list(batch["image_id"]).index(139)
  np.testing.assert_array_equal(batch["orig_size"][k], [40, 60])
  assert list(batch["labels"][k][batch["mask"][k]]) == [72]
  gt = json.load(open(pipeline.open_source(cfg).info.gt_json))
  assert {im["id"] for im in gt["images"]} == {139, 285}
  (ann,) = gt["annotations"]
  assert ann["category_id"] == 72 and ann["image_id"] == 139
  np.testing.assert_allclose(ann["bbox"], [10, 5, 30, 20], atol=1e-4)


def test_aspect_ratio_groups_from_the_tfds_records(cfg):
  """Faster R-CNN's grouped batches from the builder's records (sizes read from the JPEG headers, annotations
  through the grouped stream): image 9 (48 x 64, w/h 1.33) falls in group 5 and image 25 (64 x 40, 0.625) in group
  1 of torchvision's factor-3 bins; each is resized to a short side of 32 (long side <= 64) top-left on a canvas
  of multiples of 32, its boxes scaled by the resized / original sides, its labels COCO category ids."""
  source = pipeline.open_source(cfg)
  groups = pipeline.aspect_ratio_groups(source, lambda hw: transform.resized_size(*hw, 32, 64), 32, 3)
  assert {int(i): int(g) for i, g in zip(groups.ids, groups.group)} == {9: 5, 25: 1}
  assert groups.canvases == {5: (32, 64), 1: (64, 32)}
  data = pipeline.create_train_dataset(source, global_batch_size=1, image_size=None, seed=0, groups=groups,
                                       process_index=0, process_count=1)
  batches = {int(b["image_id"][0]): b for b in (next(data), next(data))}
  assert sorted(batches) == [9, 25]
  for image_id, canvas, size in ((9, (32, 64), (32, 42)), (25, (64, 32), (51, 32))):
    b = batches[image_id]
    assert b["image"].shape == (1, *canvas, 3) and list(b["image_size"][0]) == list(size)
    assert not b["image"][0, size[0]:].any() and not b["image"][0, :, size[1]:].any() and b["image"].max() > 0
  b = batches[9]
  np.testing.assert_allclose(b["boxes"][0][b["mask"][0]],
                             np.array([[4.5, 6.25, 24.5, 16.25], [30, 10, 64, 30]]) * ([42 / 64, 32 / 48] * 2),
                             atol=1e-4)
  assert list(b["labels"][0][b["mask"][0]]) == [90, 13] and not batches[25]["mask"].any()
