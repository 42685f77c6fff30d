"""Pipeline contract on a tiny synthetic dataset: batch format, determinism, resume, sharding, eval padding."""

import itertools
import json
import logging

import numpy as np
import pytest

from ssdlite_jax.data import config as data_config, pipeline

pytestmark = pytest.mark.tf  # imports TensorFlow

NUM_TRAIN, NUM_VAL = 12, 5


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  cfg = data_config.default_data_config()
  cfg.update(data_dir=str(tmp_path_factory.mktemp("tfds")), synthetic_num_train=NUM_TRAIN,
             synthetic_num_val=NUM_VAL, shuffle_buffer=64)
  return cfg


def _train(cfg, n, seed=0, start_step=0, index=0, count=1, batch=4):
  source = pipeline.open_source(cfg)
  it = pipeline.create_train_dataset(source, global_batch_size=batch, image_size=(64, 96), seed=seed,
                                     process_index=index, process_count=count, start_step=start_step)
  return list(itertools.islice(it, n))


def test_batch_format(cfg):
  (b,) = _train(cfg, 1)
  assert set(b) == {"image", "boxes", "labels", "mask", "image_id", "orig_size"}
  assert b["image"].shape == (4, 64, 96, 3) and b["image"].dtype == np.float32
  assert b["boxes"].shape == (4, 100, 4) and b["boxes"].dtype == np.float32
  assert b["labels"].dtype == np.int32 and b["mask"].dtype == bool and b["image_id"].dtype == np.int64
  assert b["orig_size"].dtype == np.int32 and (b["orig_size"] == [480, 640]).all()
  assert b["mask"].any(axis=1).all() and set(np.unique(b["labels"][b["mask"]])) <= {1, 2, 3}
  assert (b["labels"][~b["mask"]] == 0).all() and (b["boxes"][~b["mask"]] == 0).all()
  boxes = b["boxes"][b["mask"]]
  assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 2] <= 96 + 1e-3).all() and (boxes[:, 3] <= 64 + 1e-3).all()


def test_same_seed_same_batches_and_epochs_differ(cfg):
  a, b, c = _train(cfg, 6), _train(cfg, 6), _train(cfg, 2, seed=1)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert not np.array_equal(a[0]["image"], c[0]["image"])
  epoch0 = np.concatenate([x["image_id"] for x in a[:3]])
  epoch1 = np.concatenate([x["image_id"] for x in a[3:]])
  assert sorted(epoch0) == sorted(epoch1) == list(range(1, NUM_TRAIN + 1))  # every image once per epoch
  assert list(epoch0) != list(epoch1)


@pytest.mark.parametrize("k", [2, 4])  # inside the first epoch, and past an epoch boundary
def test_resume_at_step_gives_batch_k(cfg, k):
  full = _train(cfg, k + 1)
  (resumed,) = _train(cfg, 1, start_step=k)
  for key in resumed:
    np.testing.assert_array_equal(resumed[key], full[k][key])


@pytest.mark.parametrize("start_step", [0, 2])
def test_processes_split_each_global_batch(cfg, start_step):
  """Process i's batch k is rows [i * B, (i + 1) * B) of the single-process batch k: the global batches do not
  depend on the process count (also when resuming, and across the epoch boundary after 3 batches)."""
  single = _train(cfg, 4, start_step=start_step, batch=4)
  for count in (2, 4):
    shares = [_train(cfg, 4, start_step=start_step, index=i, count=count, batch=4) for i in range(count)]
    for k, whole in enumerate(single):
      for key in whole:
        np.testing.assert_array_equal(np.concatenate([s[k][key] for s in shares]), whole[key],
                                      err_msg=f"{count} processes, batch {k}, {key}")


def test_eval_every_image_once_with_padding(cfg):
  seen, steps = [], set()
  for index in range(2):
    source = pipeline.open_source(cfg)
    batches, num = pipeline.create_eval_dataset(source, global_batch_size=4, image_size=(64, 96),
                                                process_index=index, process_count=2)
    out = list(batches)
    steps.add((num, len(out)))
    for b in out:
      assert b["image"].shape == (2, 64, 96, 3)
      seen.extend(b["image_id"][b["valid"]])
      assert (b["image_id"][~b["valid"]] == -1).all() and not b["mask"][~b["valid"]].any()
  assert steps == {(2, 2)}  # 3 + 2 images at 2 per process step: both processes run 2 steps
  gt = json.load(open(pipeline.open_source(cfg).info.gt_json))
  assert sorted(seen) == sorted(im["id"] for im in gt["images"])


def test_more_boxes_than_max_boxes_is_reported(cfg, caplog):
  small = cfg.copy_and_resolve_references()
  small.update(max_boxes=1, augmentation="none")
  with caplog.at_level(logging.WARNING):
    source = pipeline.open_source(small)
    batches, _ = pipeline.create_eval_dataset(source, global_batch_size=5, image_size=(64, 96),
                                              process_index=0, process_count=1)
    (b,) = list(batches)
  gt = json.load(open(pipeline.open_source(cfg).info.gt_json))
  counts = {}
  for a in gt["annotations"]:
    counts[a["image_id"]] = counts.get(a["image_id"], 0) + 1
  crowded = sorted(i for i, n in counts.items() if n > 1)
  assert crowded and all(f"image id {i} has {counts[i]} boxes" in caplog.text for i in crowded)
  assert b["mask"].sum(axis=1).max() == 1
