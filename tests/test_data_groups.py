"""Aspect-ratio groups for a detector that resizes each image itself (Faster R-CNN): torchvision's bins, one canvas
per group, the batches equal to torchvision's GeneralizedRCNNTransform of the same images, resume and process split."""

import os

import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import tensorflow as tf

from ssdlite_jax.data import config as data_config, pipeline
from ssdlite_jax.rcnn import transform
from tests.helpers import import_or_skip
from tests.test_data_coco_folder import _ann, _image, write_folder

pytestmark = pytest.mark.tf

MIN_SIZE, MAX_SIZE, DIVISIBLE = 64, 128, 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# (h, w), two images each: w / h = 0.45, 0.7, 1.0, 1.33, 1.8, 2.5 against torchvision's factor-3 bins
# 2 ** linspace(-1, 1, 7) = 0.5, 0.63, 0.79, 1.0, 1.26, 1.59, 2.0 (bisect_right): groups 0, 2, 4, 5, 6, 7.
SIZES = [(200, 90), (100, 70), (90, 90), (60, 80), (50, 90), (40, 100)]
GROUPS = [0, 2, 4, 5, 6, 7]


def _noise(h, w, seed):
  return PIL.Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("groups"))
  images, anns = [], []
  for i, (h, w) in enumerate(SIZES * 2):
    images.append(_image(i + 1, f"{i}.png" if i == 3 else f"{i}.jpg", _noise(h, w, i), h, w))  # a PNG among JPEGs
    anns.append(_ann(100 + i, i + 1, 3, [w * 0.1, h * 0.2, w * 0.5, h * 0.3]))
  for split in ("train", "val"):
    write_folder(root, images, anns, split=split)
  return root


@pytest.fixture(scope="module")
def source(folder, tmp_path_factory):
  cfg = data_config.default_data_config()
  cfg.update(name="coco_folder", data_dir=str(tmp_path_factory.mktemp("tfds")), root=folder, augmentation="none",
             train_ann="annotations/instances_train.json", val_ann="annotations/instances_val.json",
             num_parallel_calls=1, max_boxes=3)
  return pipeline.open_source(cfg)


def _groups(source, factor=3):
  return pipeline.aspect_ratio_groups(source, lambda s: transform.resized_size(*s, MIN_SIZE, MAX_SIZE), DIVISIBLE,
                                      factor)


def test_groups_are_torchvisions_bins(source):
  groups = _groups(source)
  want = {i + 1: g for i, g in enumerate(GROUPS * 2)}
  assert {int(i): int(g) for i, g in zip(groups.ids, groups.group)} == want
  assert sorted(groups.canvases) == GROUPS and groups.batches_per_epoch(2) == 6 and groups.batches_per_epoch(3) == 0
  assert pipeline.aspect_ratio_bins(0) == (1.0,) and pipeline.aspect_ratio_bins(-1) is None
  one = _groups(source, factor=-1)
  assert set(one.group) == {0} and one.canvases == {0: (128, 128)} and one.batches_per_epoch(5) == 2
  with pytest.raises(ValueError, match="no aspect-ratio group .* holds a global batch of 3 images"):
    pipeline.create_train_dataset(source, global_batch_size=3, image_size=None, seed=0, groups=groups)


def test_batches_equal_torchvisions_transform(source, folder):
  """Each batch is one group's two images: normalised on the device, they equal GeneralizedRCNNTransform's padded
  batch of the same two images, decoded by TensorFlow (canvas, image sizes, pixels within 3e-5, boxes within 1e-4
  px)."""
  torch = import_or_skip("torch")
  from torchvision.models.detection.transform import GeneralizedRCNNTransform
  tv = GeneralizedRCNNTransform(MIN_SIZE, MAX_SIZE, list(MEAN), list(STD), size_divisible=DIVISIBLE).train()
  groups = _groups(source)
  data = pipeline.create_train_dataset(source, global_batch_size=2, image_size=None, seed=0, groups=groups)
  seen = set()
  for _ in range(groups.batches_per_epoch(2)):
    batch = next(data)
    ids = [int(i) for i in batch["image_id"]]
    seen.update(ids)
    assert len({GROUPS[(i - 1) % 6] for i in ids}) == 1
    decoded = [tf.io.decode_image(tf.io.read_file(os.path.join(folder, "train", f"{i - 1}.png" if i == 4 else
                                                               f"{i - 1}.jpg"))).numpy() for i in ids]
    images = [torch.from_numpy(im.astype(np.float32).transpose(2, 0, 1) / 255.0) for im in decoded]
    targets = [{"boxes": torch.tensor([[w * 0.1, h * 0.2, w * 0.6, h * 0.5]], dtype=torch.float32),
                "labels": torch.ones(1, dtype=torch.int64)} for h, w, _ in (im.shape for im in decoded)]
    t_images, t_targets = tv(images, targets)
    want = t_images.tensors.numpy().transpose(0, 2, 3, 1)
    got = np.asarray(transform.normalize(jnp.asarray(batch["image"]), jnp.asarray(batch["image_size"]), MEAN, STD))
    assert got.shape == want.shape
    np.testing.assert_array_equal(batch["image_size"], np.array(t_images.image_sizes))
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-5)   # resize weights rounded apart: 1e-3 grey level
    for b, m, t in zip(batch["boxes"], batch["mask"], t_targets):
      np.testing.assert_allclose(b[m], t["boxes"].numpy(), rtol=0, atol=1e-4)
  assert seen == set(range(1, 13))


def test_resume_and_processes_give_the_same_global_batches(source):
  groups = _groups(source)
  make = lambda **kw: pipeline.create_train_dataset(source, global_batch_size=2, image_size=None, seed=5,
                                                    groups=groups, **kw)
  stream = make()
  batches = [next(stream) for _ in range(9)]   # into the second epoch
  assert [int(i) for b in batches[:6] for i in b["image_id"]] != [int(i) for b in batches[6:] for i in b["image_id"]]
  for k in (4, 7):
    resumed = next(make(start_step=k))
    halves = [next(make(start_step=k, process_index=p, process_count=2)) for p in (0, 1)]
    for key in ("image", "image_size", "boxes", "image_id"):
      np.testing.assert_array_equal(resumed[key], batches[k][key])
      np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), batches[k][key])
