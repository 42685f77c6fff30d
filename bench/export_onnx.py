"""The onnx row of bench/export.py, in the venv of requirements-onnx.txt (jax2onnx and onnxruntime, which the main
venv lacks): converts the weights through export.py and times onnxruntime (CPUExecutionProvider, one thread per
CPU) on one 320x320 image already at the model size, as bench/export.py times the other formats.

  .venv-onnx/bin/python -m bench.export_onnx --source WEIGHTS_OR_CHECKPOINT [--runs 30]   (one RESULT line)
"""

import argparse
import os
import tempfile
import time

from bench import common


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--source", required=True, help="a .safetensors/.pth file or an orbax checkpoint directory")
  p.add_argument("--runs", type=int, default=30)
  args = p.parse_args()
  import numpy as np
  import onnxruntime as ort
  from ssdlite_jax.cli import export as export_cli

  out = os.path.join(tempfile.mkdtemp(), "model.onnx")
  source_flag = "--checkpoint" if os.path.isdir(args.source) else "--torch-weights"
  t0 = time.perf_counter()
  export_cli.main([source_flag, args.source, "--format", "onnx", "--out", out])
  convert_s = time.perf_counter() - t0
  options = ort.SessionOptions()
  options.intra_op_num_threads = os.cpu_count()
  session = ort.InferenceSession(out, options, providers=["CPUExecutionProvider"])
  image = common.synthetic_uint8_images(1, 320, 320, seed=0).astype(np.float32) / 255.0
  latency_s = common.median(common.time_calls(lambda: session.run(None, {"images": image}), args.runs, 3))
  common.emit({"convert_s": convert_s, "size_mb": os.path.getsize(out) / 1e6, "latency_s": latency_s})


if __name__ == "__main__":
  main()
