"""bench/device_check.sh end to end on the CPU (--smoke), as it is debugged before GPU time is spent: one JSON
with every figure, and a loss curve that starts at torchvision's loss for the same weights and batch."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bench import common
from ssdlite_jax import porting
from ssdlite_jax.zoo import build_model
from ssdlite_jax.ssd.configs import ssdlite320_config
from tests.helpers import REPO, import_or_skip, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.torch]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("device_check")
  # The run's compilation cache: programs the JAX worker builds twice (the fresh init of the same float32 model,
  # for the train figures and for inference) or that other tests build compile once.
  env = subprocess_env(JAX_PLATFORMS="cpu", PYTHON=sys.executable)
  proc = subprocess.run(["bash", os.path.join(REPO, "bench/device_check.sh"), "--smoke", str(out)], env=env,
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  with open(out / "device_check.json") as f:
    return out, json.load(f)


def test_one_json_with_every_figure(smoke):
  out, result = smoke
  assert result["smoke"] and (out / "device_check.log").stat().st_size > 0 and (out / "nvidia-smi.txt").exists()
  assert result["versions"]["jax"] and result["versions"]["torch"]
  ours, tv = result["ours"], result["torchvision"]
  batches = result["sizes"]["batches"]
  assert sorted((r["dtype"], r["batch"]) for r in ours["train"]) == sorted(
      (d, b) for d in ("bfloat16", "float32") for b in batches)
  for r in ours["train"]:
    assert r["images_per_s"] == pytest.approx(r["batch"] / r["step_s"]) and r["compile_s"] > 0
    assert r["device_mb"] > 0 and r["flops_per_image"] > 1e9 and np.isfinite(r["loss"])
  assert [r["batch"] for r in tv["train"]] == batches and all(r["amp_bf16"] and r["channels_last"]
                                                              for r in tv["train"])
  for side in (ours, tv):
    assert side["inference"]["latency_s"] > 0 and side["inference"]["throughput_ips"] > 0
  s = result["summary"]
  best_tv = max(r["images_per_s"] for r in tv["train"])
  best_bf16 = max(r["images_per_s"] for r in ours["train"] if r["dtype"] == "bfloat16")
  assert s["train_ratio_bf16_vs_torchvision_amp"] == pytest.approx(best_bf16 / best_tv)
  assert s["inference_latency_ratio"] == pytest.approx(ours["inference"]["latency_s"] / tv["inference"]["latency_s"])


def test_loss_curves_start_at_torchvisions_loss(smoke):
  """Step 0 of both curves is the loss of the same fresh weights on the same batch: torchvision's, in train
  mode, within float32 noise (float32 curve) and bf16 rounding (bf16 curve)."""
  torch = import_or_skip("torch")
  torchvision = import_or_skip("torchvision")
  import jax
  _, result = smoke
  curves = result["ours"]["loss_curves"]
  assert len(curves["float32"]) == len(curves["bfloat16"]) == result["sizes"]["curve_steps"]
  det = build_model(ssdlite320_config())
  variables = jax.device_get(det.init(jax.random.key(0)))
  model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).train()
  model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in porting.flax_to_torch(variables, det).items()})
  images, boxes, labels, mask = common.synthetic_train_batch(curves["batch"], 320, seed=100)
  targets = [{"boxes": torch.from_numpy(b[m]), "labels": torch.from_numpy(c[m].astype(np.int64))}
             for b, c, m in zip(boxes, labels, mask)]
  with torch.no_grad():
    losses = model([torch.from_numpy(im.transpose(2, 0, 1).copy()) for im in images], targets)
  reference = float(sum(losses.values()))
  assert curves["float32"][0] == pytest.approx(reference, rel=1e-4)
  assert curves["bfloat16"][0] == pytest.approx(reference, rel=3e-2)
