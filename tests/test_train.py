"""train.py end to end on a tiny generated dataset: a real short run; a run in a gs:// bucket (a GCS emulator on
localhost) killed with SIGKILL and resumed from the bucket, logging at an interval, whose checkpoint eval.py,
predict.py and export.py then read from the bucket; the non-finite-loss stop; a small Faster R-CNN's run and its
SIGTERM resume. Each run is a subprocess, as a user runs it; compiles are shared through JAX's persistent
compilation cache."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import PIL.Image
import pytest

import ssdlite_jax
from ssdlite_jax import checkpoint, files
from ssdlite_jax.zoo import build_model
from tests.helpers import REPO, committed_steps, import_or_skip, train_command

STEPS = 12   # two epochs of the 24 train images at batch 4


pytestmark = [pytest.mark.slow, pytest.mark.tf]


def command(train_cli, workdir, *overrides, extras=False):
  # SGD (the COCO recipe's): unlike Adam it does not amplify float noise in near-zero gradients, so a resumed
  # run's parameters can be compared to an uninterrupted run's at 1e-5.
  return train_command(train_cli, workdir, batch=4, steps=STEPS, lr=0.03, extras=extras, overrides=(
      "--config.eval_batch_size=6", "--config.checkpoint_every_steps=2", *overrides))


def run(train_cli, workdir, *overrides, check=True, extras=False, env=None):
  proc = subprocess.run(command(train_cli, workdir, *overrides, extras=extras), env=env or train_cli["env"],
                        capture_output=True, text=True, timeout=900)
  if check and proc.returncode != 0:
    raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return proc


def train_records(workdir):
  """metrics.jsonl's train records in file order (local or in the bucket)."""
  lines = files.read_text(os.path.join(workdir, "metrics.jsonl")).splitlines()
  return [r for r in map(json.loads, lines) if "train/loss" in r]


def train_losses(workdir):
  return {r["step"]: r["train/loss"] for r in train_records(workdir)}


def final_params(workdir):
  variables, _, step = checkpoint.load_variables(os.path.join(workdir, "checkpoints"))
  return step, variables


@pytest.fixture(scope="module")
def full_run(train_cli, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  proc = run(train_cli, workdir, extras=True)   # the one run whose plots and GFLOP line are read
  return workdir, proc


def test_short_run_trains_evaluates_and_logs(full_run, train_cli):
  workdir, proc = full_run
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  # The same 24 images in each epoch (in another order): the second epoch's mean loss is clearly lower. Measured
  # on the tiny model: 8.82 against 9.90.
  first, second = (np.mean([losses[s] for s in range(1 + e * STEPS // 2, 1 + (e + 1) * STEPS // 2)]) for e in (0, 1))
  assert second < 0.95 * first, losses
  assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in proc.stdout
  # absl's Python INFO lines ("I1201 19:14:35.31 1400 writer.py:444] ...") come from our files only (no
  # orbax/TFDS/jax). Not C++ ones: on AVX-512 CPUs TF 2.21 logs "I0000 ... port.cc:153] oneDNN custom operations
  # are on" at any TF_CPP_MIN_LOG_LEVEL (docs/training.md, console).
  info_sources = set(re.findall(r"^I\d{4} [\d:.]+\s+\d+ ([\w.]+\.py):\d+\]", proc.stderr, re.M))
  ours = {name for _, _, files in os.walk(os.path.dirname(ssdlite_jax.__file__)) for name in files}
  assert "training.py" in info_sources and info_sources <= ours, info_sources - ours
  # The start-up summary: 24 images / batch 4 = 6 steps per epoch; the 4-class model's parameter count.
  model = json.load(open(os.path.join(workdir, "config.json")))["model"]
  params = jax.eval_shape(build_model(ml_collections.ConfigDict(model)).init, jax.random.key(0))["params"]
  assert re.search(f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters, "
                   r"\d+\.\d\d GFLOP per 128x128 image", proc.stderr)
  assert "global batch 4, 6 steps per epoch, 12 steps; sgd lr 0.03" in proc.stderr
  with open(os.path.join(train_cli["data_dir"], next(d for d in os.listdir(train_cli["data_dir"])
                                                     if d.startswith("synthetic_shapes_")),
                         "annotations", "instances_val.json")) as f:
    val = json.load(f)
  boxes = [sum(a["category_id"] == c["id"] for a in val["annotations"]) for c in val["categories"]]
  assert (f"val: 6 images (0 without objects), {sum(boxes)} boxes: ellipse {boxes[0]}, rectangle {boxes[1]}, "
          f"triangle {boxes[2]}") in proc.stderr
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [json.loads(line) for line in f if "eval/AP" in line]
  assert evals and 0.0 <= evals[-1]["eval/AP"] <= 1.0 and evals[-1]["step"] == STEPS
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tensorboard")))
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["batch_size"] == 4 and config["model"]["class_names"][1:] == ["ellipse", "rectangle", "triangle"]
  # results.csv: a row per logged step, the eval columns filled at the final step, as metrics.jsonl has them.
  with open(os.path.join(workdir, "results.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
  assert [float(r["train/loss"]) for r in rows] == pytest.approx([losses[s] for s in range(1, STEPS + 1)])
  assert float(rows[-1]["eval/AP"]) == pytest.approx(evals[-1]["eval/AP"]) and rows[0]["eval/AP"] == ""
  for name in ("results.png", "pr_curve.png", "confusion_matrix.png", "labels.png", "val_batch_labels.jpg",
               "val_batch_pred.jpg"):
    with PIL.Image.open(os.path.join(workdir, "plots", name)) as im:
      assert min(im.size) >= 300, (name, im.size)
  with open(os.path.join(workdir, "eval", f"step_{STEPS}", "confusion_matrix.json")) as f:
    matrix = np.asarray(json.load(f)["counts"])
  with open(os.path.join(workdir, "eval", f"step_{STEPS}", "per_class.json")) as f:
    assert [r["name"] for r in json.load(f)] == ["ellipse", "rectangle", "triangle"]
  assert matrix.shape == (4, 4) and matrix[:, :3].sum() > 0   # every val object is counted: found or missed
  step, variables = final_params(workdir)
  assert step == STEPS
  assert os.path.exists(os.path.join(workdir, "eval", f"step_{STEPS}", "detections.json"))


def assert_same_params(workdir, reference, steps=STEPS):
  (s1, v1), (s2, v2) = final_params(workdir), final_params(reference)
  assert s1 == s2 == steps
  for a, b in zip(jax.tree.leaves(v1), jax.tree.leaves(v2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def assert_same_run(workdir, reference, steps=STEPS):
  ref_losses, losses = train_losses(reference), train_losses(workdir)
  for step in range(1, steps + 1):
    np.testing.assert_allclose(losses[step], ref_losses[step], rtol=1e-5, err_msg=f"step {step}")
  assert_same_params(workdir, reference, steps)


def _wait_for(predicate, proc, timeout=600, interval=0.05):
  start = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"train.py ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
    if time.time() - start > timeout:
      raise AssertionError("timed out")
    time.sleep(interval)


BUCKET_RUN = "gs://test-bucket/tiny"
LOG_EVERY = 3   # the bucket run's rerun


@pytest.fixture(scope="module")
def bucket_run(train_cli, full_run, gcs):
  """The full run's command (plots included) with --workdir gs://test-bucket/tiny: killed (SIGKILL) once a
  checkpoint is committed in the bucket, then rerun logging every LOG_EVERY steps. Returns (the step it was killed
  at, the rerun)."""
  env = dict(train_cli["env"], **gcs)
  proc = subprocess.Popen(command(train_cli, BUCKET_RUN, extras=True), env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: committed_steps(BUCKET_RUN), proc, interval=0.2)
  proc.kill()
  assert proc.wait() == -signal.SIGKILL
  killed_at = max(committed_steps(BUCKET_RUN))
  return killed_at, run(train_cli, BUCKET_RUN, f"--config.log_every_steps={LOG_EVERY}", extras=True, env=env)


def test_sigkill_in_a_bucket_and_the_rerun_resumes_from_it_as_the_local_run(bucket_run, full_run):
  """Killed once a checkpoint is committed in the bucket, the rerun resumes from that checkpoint and ends as the
  uninterrupted local-disk run: each loss it logs (every 3 steps: the mean since the last log or the resumed step)
  is the local run's mean over those steps, and every final parameter is the local run's. Logs, evaluation,
  results.csv, plots and TensorBoard events are all in the bucket. (SIGTERM: the Faster R-CNN test below.)"""
  from etils import epath
  killed_at, rerun = bucket_run
  assert 0 < killed_at < STEPS
  assert f"resumed from its checkpoint of step {killed_at}" in rerun.stderr
  logged = [s for s in range(killed_at + 1, STEPS + 1) if s % LOG_EVERY == 0 or s == STEPS]
  records = train_records(BUCKET_RUN)[-len(logged):]   # the rerun's lines, after what the killed run synced
  assert [r["step"] for r in records] == logged
  local = train_losses(full_run[0])
  for start, r in zip([killed_at] + logged, records):
    np.testing.assert_allclose(r["train/loss"], np.mean([local[s] for s in range(start + 1, r["step"] + 1)]),
                               rtol=1e-5, err_msg=f"step {r['step']}")
  assert_same_params(BUCKET_RUN, full_run[0])
  bucket = epath.Path(BUCKET_RUN)
  assert sorted(p.name for p in (bucket / "eval" / f"step_{STEPS}").iterdir()) == [
      "confusion_matrix.json", "detections.json", "metrics.json", "per_class.json"]
  assert sorted(p.name for p in (bucket / "plots").iterdir()) == [
      "confusion_matrix.png", "labels.png", "pr_curve.png", "results.png", "val_batch_labels.jpg",
      "val_batch_pred.jpg"]
  rows = list(csv.DictReader(files.read_text(bucket / "results.csv").splitlines()))
  assert [int(r["step"]) for r in rows][-len(logged):] == logged and rows[-1]["eval/AP"] != ""
  # One events file per launch: the killed run's (synced with its checkpoints) and the rerun's.
  assert len([p for p in (bucket / "tensorboard").iterdir() if p.name.startswith("events.out.tfevents")]) == 2
  assert json.loads((bucket / "config.json").read_text())["batch_size"] == 4


def download(url, local):
  """A copy of the bucket folder `url` on local disk, made by gcsfs directly (not through ssdlite_jax.files)."""
  import fsspec
  fsspec.filesystem("gs").get(url.removeprefix("gs://") + "/", str(local) + "/", recursive=True)
  return local


def test_eval_predict_and_export_read_the_checkpoint_in_the_bucket(bucket_run, train_cli, gcs, tmp_path):
  """eval.py, predict.py and export.py given the bucket's checkpoint and writing into the bucket produce exactly
  what they produce from a local copy of it: the same COCO metrics, the same detections JSON, the same exported
  program."""
  from configs import synthetic
  from etils import epath
  from ssdlite_jax.cli import eval as eval_cli, export as export_cli, predict
  local = download(f"{BUCKET_RUN}/checkpoints/{STEPS}", tmp_path / "checkpoints" / str(STEPS)).parent
  config = synthetic.get_config()
  config.data.update(data_dir=train_cli["data_dir"], synthetic_num_train=24, synthetic_num_val=6)
  config.eval_batch_size = 6
  metrics = {where: eval_cli.run(config, weights=ckpt, out_dir=out) for where, ckpt, out in (
      ("bucket", f"{BUCKET_RUN}/checkpoints", f"{BUCKET_RUN}/eval_cli"),
      ("local", str(local), str(tmp_path / "eval_cli")))}
  assert metrics["bucket"] == metrics["local"]
  assert json.loads((epath.Path(BUCKET_RUN) / "eval_cli" / "metrics.json").read_text()) == metrics["local"]

  image = tmp_path / "shapes.png"
  PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 140, 3), np.uint8)).save(image)
  files.upload(str(image), f"{BUCKET_RUN}/images/shapes.png")
  # the bucket: a folder of images, --step best (the evaluated final step, as the local copy's only step)
  for ckpt, root, img, step in ((f"{BUCKET_RUN}/checkpoints", BUCKET_RUN, f"{BUCKET_RUN}/images", "best"),
                                (str(local), str(tmp_path), str(image), str(STEPS))):
    predict.main(["--weights", ckpt, "--step", step, "--out", f"{root}/dets.json", "--draw", f"{root}/drawn",
                  "--conf", "0", img])
    export_cli.main(["--weights", ckpt, "--format", "stablehlo", "--out", f"{root}/tiny.jaxexport"])
  got, want = (json.loads(files.read_text(f"{root}/dets.json")) for root in (BUCKET_RUN, tmp_path))
  assert [d["image"] for d in got] == [f"{BUCKET_RUN}/images/shapes.png"]
  assert [{k: v for k, v in d.items() if k != "image"} for d in got] == [
      {k: v for k, v in d.items() if k != "image"} for d in want] and want[0]["scores"]
  with PIL.Image.open(epath.Path(BUCKET_RUN, "drawn", "shapes.jpg").open("rb")) as im:
    assert im.size == (140, 100)
  exported = epath.Path(BUCKET_RUN) / "tiny.jaxexport"
  assert exported.read_bytes() == (tmp_path / "tiny.jaxexport").read_bytes()
  meta = json.loads(epath.Path(f"{exported}.json").read_text())
  assert meta["format"] == "stablehlo" and meta["source"].startswith(f"{BUCKET_RUN}/checkpoints")


def test_non_finite_loss_stops_naming_the_step(train_cli, tmp_path):
  proc = run(train_cli, tmp_path, "--config.optim.learning_rate=1e30", check=False)
  assert proc.returncode != 0
  assert "non-finite loss or gradient at step" in proc.stderr
  bad_step = int(proc.stderr.split("non-finite loss or gradient at step ")[1].split()[0])
  kept = [int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit()]
  assert all(s < bad_step for s in kept)


RCNN_STEPS = 8


def rcnn_command(train_cli, workdir, backbone, plots=False):
  """fasterrcnn_mobilenet_v3_large_320_fpn's recipe through train.py on the synthetic set, small (width 0.25, 128 /
  256 px, 300 train proposals), the backbone from `backbone` (a torchvision mobilenet_v3_large file), a checkpoint
  every 2 steps."""
  return [sys.executable, os.path.join(REPO, "train.py"), "--config",
          os.path.join(REPO, "configs/fasterrcnn_mobilenet_v3_large_320_fpn.py"), "--workdir", str(workdir),
          "--config.data.name=synthetic", f"--config.data.data_dir={train_cli['data_dir']}",
          "--config.data.synthetic_num_train=24", "--config.data.synthetic_num_val=6", "--config.model.num_classes=4",
          "--config.model.backbone_kwargs.width_mult=0.25", "--config.model.min_size=128",
          "--config.model.max_size=256", "--config.model.rpn_pre_nms_top_n_train=300",
          "--config.model.rpn_post_nms_top_n_train=300", f"--config.init_backbone_from={backbone}",
          "--config.batch_size=4", f"--config.max_steps={RCNN_STEPS}", "--config.eval_every_epochs=0",
          "--config.log_every_steps=1", "--config.checkpoint_every_steps=2", "--config.optim.warmup_iters=0",
          f"--config.plots={plots}", "--config.count_flops=False"]


@pytest.fixture(scope="module")
def rcnn_run(train_cli, tmp_path_factory):
  """The uninterrupted small Faster R-CNN run: (command for a workdir, workdir, process, the backbone state_dict),
  its backbone a generated torchvision mobilenet_v3_large(width_mult=0.25) file."""
  torch = import_or_skip("torch")
  torchvision = import_or_skip("torchvision")
  tmp = tmp_path_factory.mktemp("rcnn")
  torch.manual_seed(0)
  imagenet = torchvision.models.mobilenet_v3_large(width_mult=0.25)
  state = {k: v + 0.1 * torch.rand_like(v) if k.endswith("running_var") else v
           for k, v in imagenet.state_dict().items()}
  torch.save(state, tmp / "mobilenet_v3_large.pth")
  cmd = lambda workdir, plots=False: rcnn_command(train_cli, workdir, tmp / "mobilenet_v3_large.pth", plots)
  proc = subprocess.run(cmd(tmp / "run", plots=True), env=train_cli["env"], capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return cmd, tmp / "run", proc, state


def test_faster_rcnn_trains_from_an_imagenet_backbone_with_its_stages_frozen(rcnn_run):
  """The recipe's frozen features 0-6 (torchvision's default with ImageNet weights), one aspect-ratio group (480 x
  640 -> 128 x 170 on a 128 x 192 canvas) and its compiled step, the four losses logged at every step and falling,
  evaluation, results.csv, the per-class table and the plots at the end."""
  _, workdir, proc, state = rcnn_run
  assert "aspect-ratio groups (factor 3), a compiled step each: 128x192 (24 images, 6 batches)" in proc.stderr
  assert "train step compiled for the 128x192 canvas (aspect-ratio group 5)" in proc.stderr
  assert "frozen: " + ", ".join(["body/stem"] + [f"body/block{i}" for i in range(1, 7)]) + "\n" in proc.stderr
  with open(workdir / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  train = [r for r in records if "train/loss" in r]
  terms = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")
  assert [r["step"] for r in train] == list(range(1, RCNN_STEPS + 1))
  for r in train:
    assert r["train/loss"] == pytest.approx(sum(r[f"train/{t}"] for t in terms), rel=1e-5)
    assert r["train/rpn_positives"] > 0 and r["train/roi_positives"] > 0
  assert np.mean([r["train/loss"] for r in train[-3:]]) < 0.97 * train[0]["train/loss"], train
  assert [r["step"] for r in records if "eval/AP" in r] == [RCNN_STEPS]
  with open(workdir / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [int(r["step"]) for r in rows] == list(range(1, RCNN_STEPS + 1)) and rows[-1]["eval/AP"] != ""
  assert all(float(r["train/loss_classifier"]) > 0 for r in rows)
  with open(workdir / "eval" / f"step_{RCNN_STEPS}" / "per_class.json") as f:
    assert [r["name"] for r in json.load(f)] == ["ellipse", "rectangle", "triangle"]
  assert sorted(os.listdir(workdir / "plots")) == ["confusion_matrix.png", "labels.png", "pr_curve.png",
                                                   "results.png", "val_batch_labels.jpg", "val_batch_pred.jpg"]
  # Frozen: the imported ImageNet tensors of features 0-6 are still exactly the file's; features 7+ moved off theirs.
  variables, _, _ = checkpoint.load_variables(str(workdir / "checkpoints"))
  body = variables["params"]["body"]
  np.testing.assert_array_equal(np.asarray(body["stem"]["conv"]["kernel"]),
                                state["features.0.0.weight"].numpy().transpose(2, 3, 1, 0))
  for name, key in (("block6", "features.6.block.0.0.weight"), ("block7", "features.7.block.0.0.weight")):
    got, file = np.asarray(body[name]["expand"]["conv"]["kernel"]), state[key].numpy().transpose(2, 3, 1, 0)
    assert np.array_equal(got, file) == (name == "block6"), name
  assert np.abs(got - file).max() < 0.05 * np.abs(file).max()   # imported, then trained a little


def test_faster_rcnn_sigterm_saves_and_the_rerun_resumes_as_the_uninterrupted_run(rcnn_run, train_cli, tmp_path):
  """SIGTERM during the set-up stops after the first step with its checkpoint; the rerun resumes there (the
  aspect-ratio-grouped stream from batch 1, the sampler's key from the restored state) and ends as the
  uninterrupted run: every step's losses and the final parameters."""
  cmd, reference, *_ = rcnn_run
  proc = subprocess.Popen(cmd(tmp_path), env=train_cli["env"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  _wait_for(lambda: os.path.exists(tmp_path / "config.json"), proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0 and "received signal 15: saving step 1 and exiting" in err, err[-3000:]
  assert sorted(train_losses(tmp_path)) == [1] and final_params(tmp_path)[0] == 1
  proc = subprocess.run(cmd(tmp_path), env=train_cli["env"], capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert "resumed from its checkpoint of step 1" in proc.stderr
  assert_same_run(tmp_path, reference, RCNN_STEPS)
