"""Exported formats against the Predictor's detect function and torchvision eager: batch-1 latency on this CPU
(same threads, same run, the same 320x320 input already at the model size), file size and conversion time.

  python -m bench.export [--runs 30]

Weights: a random torchvision SSDlite320 (the file formats' sizes and speeds do not depend on the values; random
init gives 300 detections per image, the post-processing's worst case). Prints a table and one JSON line.
"""

import argparse
import json
import os
import tempfile
import time

from bench import common


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--runs", type=int, default=30)
  args = p.parse_args()
  import torch  # before TensorFlow
  import torchvision
  import jax
  import numpy as np
  from ai_edge_litert.interpreter import Interpreter
  from ssdlite_jax import detect, porting
  from ssdlite_jax.cli import export as export_cli
  from ssdlite_jax.loading import load_detector

  threads = os.cpu_count()
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
  tmp = tempfile.mkdtemp()
  weights = os.path.join(tmp, "ssdlite320.safetensors")
  porting.save_state_dict({k: v.numpy() for k, v in model.state_dict().items()}, weights)
  image = common.synthetic_uint8_images(1, 320, 320, seed=0)[0].astype(np.float32) / 255.0
  sizes = np.array([[320, 320]], np.int32)
  rows = {}

  detector, variables, _ = load_detector(weights)
  fn = detect.make_detect_fn(detector)
  rows["Predictor detect fn (jit)"] = {"latency_s": common.median(common.time_calls(
      lambda: jax.block_until_ready(fn(variables, image[None], sizes)), args.runs, 3))}
  with torch.inference_mode():
    x = [torch.from_numpy(image).permute(2, 0, 1)]
    rows["torchvision eager"] = {"latency_s": common.median(common.time_calls(lambda: model(x), args.runs, 3))}

  for fmt, name in (("stablehlo", "model.jaxexport"), ("tflite", "model.tflite")):
    out = os.path.join(tmp, name)
    t0 = time.perf_counter()
    export_cli.main(["--torch-weights", weights, "--format", fmt, "--out", out])
    row = {"convert_s": time.perf_counter() - t0, "size_mb": os.path.getsize(out) / 1e6}
    if fmt == "stablehlo":
      exported = jax.export.deserialize(bytearray(open(out, "rb").read()))
      call = lambda: jax.block_until_ready(exported.call(image[None], sizes))
    else:
      interpreter = Interpreter(model_path=out, num_threads=threads)
      interpreter.allocate_tensors()
      interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image[None])
      call = interpreter.invoke
    row["latency_s"] = common.median(common.time_calls(call, args.runs, 3))
    rows[f"{fmt} ({name})"] = row

  tv = rows["torchvision eager"]["latency_s"]
  print(f"export, SSDlite320 91 classes, batch 1, 320x320 float input, {threads} CPUs")
  print(f"{'':<30}{'latency ms':>12}{'vs torchvision':>16}{'size MB':>10}{'convert s':>11}")
  for name, r in rows.items():
    size = f"{r['size_mb']:.2f}" if "size_mb" in r else ""
    conv = f"{r['convert_s']:.1f}" if "convert_s" in r else ""
    print(f"{name:<30}{r['latency_s'] * 1e3:>12.1f}{r['latency_s'] / tv:>15.2f}x{size:>10}{conv:>11}")
  print(json.dumps({"bench": "export", "cpus": threads, "rows": rows}))


if __name__ == "__main__":
  main()
