"""Exported formats against the Predictor's detect function and torchvision eager: batch-1 latency on this CPU
(same threads, same run, the same 320x320 input already at the model size), file size and conversion time; with
--checkpoint, the COCO mAP of the Predictor and of every file on the config's validation split (the ONNX venv has
no TensorFlow to read it: this process writes the images, that venv's worker their detections, scored here).

  python -m bench.export [--runs 30] [--checkpoint runs/synthetic/checkpoints] [--config configs/synthetic.py]
                         [--onnx-python .venv-onnx/bin/python]

Weights: a random torchvision SSDlite320 (the file formats' sizes and speeds do not depend on the values; random
init gives 300 detections per image, the post-processing's worst case), or the --checkpoint's. tflite-int8 is
calibrated on 200 train images of --config's dataset. Prints a table and one JSON line.
"""

import argparse
import json
import os
import tempfile
import time

from bench import common


def _tflite_detect_fn(path, threads, int8):
  """evaluation.evaluate's detect_fn for a LiteRT file: images [B, S, S, 3] in [0, 1], orig_sizes [B, 2] ->
  {boxes [B, D, 4] xyxy original px, scores, labels, valid}, one interpreter call per image."""
  import numpy as np
  from ai_edge_litert.interpreter import Interpreter
  interpreter = Interpreter(model_path=path, num_threads=threads)
  interpreter.allocate_tensors()
  index = interpreter.get_input_details()[0]["index"]

  def fn(_, images, orig_sizes):
    out = {"boxes": [], "scores": [], "labels": [], "valid": []}
    for image, (h, w) in zip(np.asarray(images), np.asarray(orig_sizes)):
      pixels = np.round(image * 255).astype(np.uint8) if int8 else image.astype(np.float32)
      interpreter.set_tensor(index, pixels[None])
      interpreter.invoke()
      boxes, classes, scores, _ = (interpreter.get_tensor(d["index"])[0] for d in interpreter.get_output_details())
      out["boxes"].append(boxes[:, [1, 0, 3, 2]] * np.array([w, h, w, h], np.float32))
      out["scores"].append(scores)
      out["labels"].append(np.where(scores > 0, classes.astype(np.int32) + 1, 0))
      out["valid"].append(scores > 0)
    return {k: np.stack(v) for k, v in out.items()}
  return fn


def _replay(dets):
  """evaluation.evaluate's detect_fn that returns precomputed detections (the Predictor's layout, [N, ...] for the
  N images of the batches in order), batch after batch."""
  position = [0]

  def fn(_, images, orig_sizes):
    start, position[0] = position[0], position[0] + len(images)
    return {k: v[start:position[0]] for k, v in dets.items()}
  return fn


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--runs", type=int, default=30)
  p.add_argument("--checkpoint", default=None, help="trained weights: adds the mAP of each format")
  p.add_argument("--config", default="configs/synthetic.py", help="calibration and evaluation data")
  p.add_argument("--onnx-python", default=None,
                 help="the python of a requirements-onnx.txt venv (e.g. .venv-onnx/bin/python): adds the onnx row")
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

  weights = args.checkpoint or weights
  detector, variables, _ = load_detector(weights)
  fn = detect.make_detect_fn(detector)
  rows["Predictor detect fn (jit)"] = {"latency_s": common.median(common.time_calls(
      lambda: jax.block_until_ready(fn(variables, image[None], sizes)), args.runs, 3))}
  with torch.inference_mode():
    x = [torch.from_numpy(image).permute(2, 0, 1)]
    rows["torchvision eager"] = {"latency_s": common.median(common.time_calls(lambda: model(x), args.runs, 3))}

  files = {}
  for fmt, name in (("stablehlo", "model.jaxexport"), ("tflite", "model.tflite"), ("tflite-int8", "int8.tflite")):
    out = files[fmt] = os.path.join(tmp, name)
    t0 = time.perf_counter()
    calibration = ["--calibration-data", args.config] if fmt == "tflite-int8" else []
    export_cli.main(["--checkpoint" if args.checkpoint else "--torch-weights", weights, "--format", fmt,
                     "--out", out, *calibration])
    row = {"convert_s": time.perf_counter() - t0, "size_mb": os.path.getsize(out) / 1e6}
    if fmt == "stablehlo":
      exported = jax.export.deserialize(bytearray(open(out, "rb").read()))
      call = lambda: jax.block_until_ready(exported.call(image[None], sizes))
    else:
      interpreter = Interpreter(model_path=out, num_threads=threads)
      interpreter.allocate_tensors()
      pixels = np.round(image * 255).astype(np.uint8) if fmt == "tflite-int8" else image
      interpreter.set_tensor(interpreter.get_input_details()[0]["index"], pixels[None])
      call = interpreter.invoke
    row["latency_s"] = common.median(common.time_calls(call, args.runs, 3))
    rows[f"{fmt} ({name})"] = row
  evaluation_images = None
  if args.checkpoint:
    from ssdlite_jax.cli.export import load_config
    from ssdlite_jax.data import pipeline
    source = pipeline.open_source(load_config(args.config).data)
    batches, _ = pipeline.create_eval_dataset(source, global_batch_size=8, image_size=detector.image_size)
    batches = [jax.device_get(b) for b in batches]
    evaluation_images = os.path.join(tmp, "eval_images.npz")
    np.savez(evaluation_images, images=np.concatenate([b["image"] for b in batches]),
             orig_sizes=np.concatenate([b["orig_size"] for b in batches]))
  if args.onnx_python:   # jax2onnx and onnxruntime live in a venv of their own
    onnx_dets = os.path.join(tmp, "onnx_dets.npz")
    flags = ["--eval-in", evaluation_images, "--eval-out", onnx_dets] if args.checkpoint else []
    rows["onnx (model.onnx)"] = common.run_worker("bench.export_onnx", ["--source", weights, "--runs", args.runs,
                                                                        *flags], python=args.onnx_python)

  if args.checkpoint:
    from ssdlite_jax import evaluation
    evaluate = lambda fn: evaluation.evaluate(fn, variables, batches, source.info.label_to_category_id,
                                              source.info.gt_json)
    rows["Predictor detect fn (jit)"].update(evaluate(detect.make_detect_fn(detector)))
    for fmt in ("tflite", "tflite-int8"):
      row = next(r for name, r in rows.items() if name.startswith(fmt + " "))
      row.update(evaluate(_tflite_detect_fn(files[fmt], threads, fmt == "tflite-int8")))
    exported = jax.export.deserialize(bytearray(open(files["stablehlo"], "rb").read()))
    rows["stablehlo (model.jaxexport)"].update(evaluate(lambda _, images, sizes: exported.call(images, sizes)))
    if args.onnx_python:
      rows["onnx (model.onnx)"].update(evaluate(_replay(dict(np.load(onnx_dets)))))

  tv = rows["torchvision eager"]["latency_s"]
  print(f"export, SSDlite320 {detector.config.num_classes} classes (background included), batch 1, "
        f"320x320 float input, {threads} CPUs")
  print(f"{'':<32}{'latency ms':>12}{'vs torchvision':>16}{'size MB':>10}{'convert s':>11}{'AP':>8}{'AP50':>8}")
  for name, r in rows.items():
    size = f"{r['size_mb']:.2f}" if "size_mb" in r else ""
    conv = f"{r['convert_s']:.1f}" if "convert_s" in r else ""
    ap = f"{r['AP']:>8.3f}{r['AP50']:>8.3f}" if "AP" in r else ""
    print(f"{name:<32}{r['latency_s'] * 1e3:>12.1f}{r['latency_s'] / tv:>15.2f}x{size:>10}{conv:>11}{ap}")
  print(json.dumps({"bench": "export", "cpus": threads, "rows": rows}))


if __name__ == "__main__":
  main()
