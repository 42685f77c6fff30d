"""train.py end to end on a tiny generated dataset: a real short run, resume (rerun, SIGTERM, SIGKILL),
the non-finite-loss stop. Each run is a subprocess, as a user runs it; compiles are shared through
JAX's persistent compilation cache."""

import csv
import json
import os
import re
import signal
import subprocess
import time

import jax
import ml_collections
import numpy as np
import PIL.Image
import pytest

import ssdlite_jax
from ssdlite_jax import checkpoint
from ssdlite_jax.zoo import build_model
from tests.helpers import train_command

STEPS = 12   # two epochs of the 24 train images at batch 4


pytestmark = [pytest.mark.slow, pytest.mark.tf]


def command(train_cli, workdir, *overrides, extras=False):
  # SGD (the COCO recipe's): unlike Adam it does not amplify float noise in near-zero gradients, so a resumed
  # run's parameters can be compared to an uninterrupted run's at 1e-5.
  return train_command(train_cli, workdir, batch=4, steps=STEPS, lr=0.03, extras=extras, overrides=(
      "--config.eval_batch_size=6", "--config.checkpoint_every_steps=2", *overrides))


def run(train_cli, workdir, *overrides, check=True, extras=False):
  proc = subprocess.run(command(train_cli, workdir, *overrides, extras=extras), env=train_cli["env"],
                        capture_output=True, text=True, timeout=900)
  if check and proc.returncode != 0:
    raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return proc


def train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


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
  # are on" at any TF_CPP_MIN_LOG_LEVEL (README, console).
  info_sources = set(re.findall(r"^I\d{4} [\d:.]+\s+\d+ ([\w.]+\.py):\d+\]", proc.stderr, re.M))
  ours = {name for _, _, files in os.walk(os.path.dirname(ssdlite_jax.__file__)) for name in files}
  assert "training.py" in info_sources and info_sources <= ours, info_sources - ours
  # The start-up summary: 24 images / batch 4 = 6 steps per epoch; the 4-class model's parameter count.
  model = json.load(open(os.path.join(workdir, "config.json")))["model"]
  params = jax.eval_shape(build_model(ml_collections.ConfigDict(model)).init, jax.random.key(0))["params"]
  assert re.search(f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters, " r"\d+\.\d\d GFLOP per image",
                   proc.stderr)
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


def assert_same_params(workdir, reference):
  (s1, v1), (s2, v2) = final_params(workdir), final_params(reference)
  assert s1 == s2 == STEPS
  for a, b in zip(jax.tree.leaves(v1), jax.tree.leaves(v2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def assert_same_run(workdir, reference):
  ref_losses, losses = train_losses(reference), train_losses(workdir)
  for step in range(1, STEPS + 1):
    np.testing.assert_allclose(losses[step], ref_losses[step], rtol=1e-5, err_msg=f"step {step}")
  assert_same_params(workdir, reference)


def test_rerun_resumes_where_it_stopped_and_logs_interval_means(train_cli, full_run, tmp_path):
  """Logging every 3 steps, the logged loss is the mean over the 3 steps (the full run logs each step)."""
  run(train_cli, tmp_path, "--config.max_steps=3", "--config.log_every_steps=3")
  assert sorted(train_losses(tmp_path)) == [3]
  run(train_cli, tmp_path, "--config.log_every_steps=3")
  ref, logged = train_losses(full_run[0]), train_losses(tmp_path)
  assert sorted(logged) == list(range(3, STEPS + 1, 3))
  for step in logged:
    np.testing.assert_allclose(logged[step], np.mean([ref[s] for s in range(step - 2, step + 1)]), rtol=1e-5)
  assert_same_params(tmp_path, full_run[0])


def _wait_for(predicate, proc, timeout=600):
  start = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"train.py ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
    if time.time() - start > timeout:
      raise AssertionError("timed out")
    time.sleep(0.05)


def test_sigterm_saves_and_sigkill_resumes(train_cli, full_run, tmp_path):
  """SIGTERM during the set-up (config.json is written after the handler is installed) stops after the first
  step with its checkpoint; SIGKILL after a later checkpoint; the rerun then ends as an uninterrupted run."""
  ckpts = tmp_path / "checkpoints"
  proc = subprocess.Popen(command(train_cli, tmp_path), env=train_cli["env"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: os.path.exists(tmp_path / "config.json"), proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 0
  assert max(train_losses(tmp_path)) == final_params(tmp_path)[0] == 1
  stopped_at = 1

  proc = subprocess.Popen(command(train_cli, tmp_path), env=train_cli["env"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: any(p.name.isdigit() and int(p.name) > stopped_at for p in ckpts.iterdir()), proc)
  proc.kill()
  assert proc.wait() == -signal.SIGKILL
  run(train_cli, tmp_path)
  assert_same_run(tmp_path, full_run[0])


def test_non_finite_loss_stops_naming_the_step(train_cli, tmp_path):
  proc = run(train_cli, tmp_path, "--config.optim.learning_rate=1e30", check=False)
  assert proc.returncode != 0
  assert "non-finite loss or gradient at step" in proc.stderr
  bad_step = int(proc.stderr.split("non-finite loss or gradient at step ")[1].split()[0])
  kept = [int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit()]
  assert all(s < bad_step for s in kept)
