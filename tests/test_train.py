"""train.py end to end on a tiny generated dataset: a real short run, resume (rerun, SIGTERM, SIGKILL),
the non-finite-loss stop. Each run is a subprocess, as a user runs it; compiles are shared through
JAX's persistent compilation cache."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ssdlite_jax import checkpoint
from tests.conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("train")
  e = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
           JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"))
  e["XLA_FLAGS"] = xla_flags()
  return {"env": e, "data_dir": str(tmp / "tfds")}


def command(env, workdir, *overrides):
  return [sys.executable, os.path.join(REPO, "train.py"), "--config", os.path.join(REPO, "configs/synthetic.py"),
          "--workdir", str(workdir), f"--config.data.data_dir={env['data_dir']}",
          "--config.data.synthetic_num_train=24", "--config.data.synthetic_num_val=6",
          "--config.batch_size=4", "--config.eval_batch_size=6", "--config.model.image_size=160",
          f"--config.max_steps={STEPS}", "--config.eval_every_epochs=0", "--config.log_every_steps=1",
          "--config.checkpoint_every_steps=2", "--config.optim.warmup_iters=0",
          # SGD (the COCO recipe's): unlike Adam it does not amplify float noise in near-zero gradients, so a
          # resumed run's parameters can be compared to an uninterrupted run's at 1e-5.
          "--config.optim.optimizer=sgd", "--config.optim.learning_rate=0.01", "--config.optim.base_batch_size=4",
          *overrides]


def run(env, workdir, *overrides, check=True):
  proc = subprocess.run(command(env, workdir, *overrides), env=env["env"], capture_output=True, text=True,
                        timeout=900)
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
def full_run(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  proc = run(env, workdir)
  return workdir, proc


def test_short_run_trains_evaluates_and_logs(full_run):
  workdir, proc = full_run
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  first, last = np.mean([losses[1], losses[2]]), np.mean([losses[s] for s in range(STEPS - 2, STEPS + 1)])
  assert last < 0.95 * first, losses
  assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in proc.stdout
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [json.loads(line) for line in f if "eval/AP" in line]
  assert evals and 0.0 <= evals[-1]["eval/AP"] <= 1.0 and evals[-1]["step"] == STEPS
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tensorboard")))
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["batch_size"] == 4 and config["model"]["class_names"][1:] == ["ellipse", "rectangle", "triangle"]
  assert os.path.exists(os.path.join(workdir, "predictions", "val_0.jpg"))
  step, variables = final_params(workdir)
  assert step == STEPS
  assert os.path.exists(os.path.join(workdir, "eval", f"step_{STEPS}", "detections.json"))


def assert_same_run(workdir, reference):
  ref_losses, losses = train_losses(reference), train_losses(workdir)
  for step in range(1, STEPS + 1):
    np.testing.assert_allclose(losses[step], ref_losses[step], rtol=1e-5, err_msg=f"step {step}")
  (s1, v1), (s2, v2) = final_params(workdir), final_params(reference)
  assert s1 == s2 == STEPS
  for a, b in zip(jax.tree.leaves(v1), jax.tree.leaves(v2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_rerun_resumes_where_it_stopped(env, full_run, tmp_path):
  run(env, tmp_path, "--config.max_steps=3")
  assert sorted(train_losses(tmp_path)) == [1, 2, 3]
  run(env, tmp_path)
  assert_same_run(tmp_path, full_run[0])


def _wait_for(predicate, proc, timeout=600):
  start = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"train.py ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
    if time.time() - start > timeout:
      raise AssertionError("timed out")
    time.sleep(0.2)


def test_sigterm_saves_and_sigkill_resumes(env, full_run, tmp_path):
  ckpts = tmp_path / "checkpoints"
  proc = subprocess.Popen(command(env, tmp_path), env=env["env"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: os.path.exists(tmp_path / "metrics.jsonl") and train_losses(tmp_path), proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 0
  stopped_at = max(train_losses(tmp_path))
  assert stopped_at < STEPS and final_params(tmp_path)[0] == stopped_at

  proc = subprocess.Popen(command(env, tmp_path), env=env["env"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: any(p.name.isdigit() and int(p.name) > stopped_at for p in ckpts.iterdir()), proc)
  proc.kill()
  assert proc.wait() == -signal.SIGKILL
  run(env, tmp_path)
  assert_same_run(tmp_path, full_run[0])


def test_non_finite_loss_stops_naming_the_step(env, tmp_path):
  proc = run(env, tmp_path, "--config.optim.learning_rate=1e30", check=False)
  assert proc.returncode != 0
  assert "non-finite loss or gradient at step" in proc.stderr
  bad_step = int(proc.stderr.split("non-finite loss or gradient at step ")[1].split()[0])
  kept = [int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit()]
  assert all(s < bad_step for s in kept)
