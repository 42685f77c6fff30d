"""The onnx row of bench/export.py, in the venv of requirements-onnx.txt (jax2onnx and onnxruntime, which the main
venv lacks): converts the weights through export.py and times onnxruntime (CPUExecutionProvider, one thread per
CPU) on one 320x320 image already at the model size, as bench/export.py times the other formats; with --eval-in,
also writes the file's detections of those images (the evaluation split, which this venv cannot read without
TensorFlow) for bench/export.py to score.

  .venv-onnx/bin/python -m bench.export_onnx --source WEIGHTS_OR_CHECKPOINT [--runs 30]
      [--eval-in IMAGES.npz --eval-out DETECTIONS.npz]   (one RESULT line)

IMAGES.npz: images [N, S, S, 3] float32 at the model size, orig_sizes [N, 2] (h, w); DETECTIONS.npz: boxes
[N, D, 4] xyxy original px, scores, labels, valid [N, D] (the Predictor's layout).
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
  p.add_argument("--eval-in", default=None, help="images to detect (npz: images, orig_sizes)")
  p.add_argument("--eval-out", default=None, help="where to write their detections (npz)")
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
  if args.eval_in:
    _detect_all(session, args.eval_in, args.eval_out)
  common.emit({"convert_s": convert_s, "size_mb": os.path.getsize(out) / 1e6, "latency_s": latency_s})


def _detect_all(session, images_npz, out_npz, batch=8):
  """The session's detections of images_npz's images, in the Predictor's layout, written to out_npz."""
  import numpy as np
  data = np.load(images_npz)
  parts = []
  for start in range(0, len(data["images"]), batch):
    images, sizes = data["images"][start:start + batch], data["orig_sizes"][start:start + batch]
    boxes, scores, labels, num = session.run(None, {"images": images})
    scale = np.stack([sizes[:, 1], sizes[:, 0]] * 2, 1)[:, None].astype(np.float32)   # (w, h, w, h)
    parts.append({"boxes": boxes * scale, "scores": scores, "labels": labels.astype(np.int32),
                  "valid": np.arange(scores.shape[1])[None] < num[:, None]})
  np.savez(out_npz, **{k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


if __name__ == "__main__":
  main()
