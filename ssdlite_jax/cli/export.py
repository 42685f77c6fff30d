"""Export a trained detector for deployment, post-processing included.

  python export.py --weights runs/mine/checkpoints --format stablehlo --out mine.jaxexport
  python export.py --weights ssdlite320_mobilenet_v3_large --format tflite --out coco.tflite --score-thresh 0.3
  python export.py --weights DIR --format tflite-int8 --calibration-data configs/synthetic.py --out mine.tflite
  python export.py --weights DIR --format saved_model --out models/mine/1
  python export.py --weights gs://BUCKET/run/checkpoints --format stablehlo --out gs://BUCKET/mine.jaxexport
  python export.py --weights DIR --format onnx --out mine.onnx   # in the venv of requirements-onnx.txt
  python export.py --weights fasterrcnn_mobilenet_v3_large_320_fpn --format stablehlo \
      --input-size 480x640 --out frcnn.jaxexport

Writes OUT and OUT.json (metadata: classes, input/output layout, post-processing). Formats: stablehlo
(jax.export, batch-polymorphic; ssdlite_jax/export/stablehlo.py says how to run it), tflite (LiteRT float32,
batch 1, the 4-output SSD layout; ssdlite_jax/export/tflite.py) and tflite-int8 (the same layout, int8 network
calibrated on the first --calibration-images train images of the --calibration-data config's dataset,
preprocessed as for evaluation; uint8 input) and saved_model (the tflite float32 graph as a TensorFlow SavedModel
directory for TF Serving; ssdlite_jax/export/saved_model.py) and onnx (opset 18, dynamic batch, NMS as ONNX's
NonMaxSuppression, for onnxruntime; converted by jax2onnx, installed apart: pip install -r requirements-onnx.txt;
ssdlite_jax/export/onnx.py).
"""

import argparse
import os
import sys

from ssdlite_jax import export as export_lib
from ssdlite_jax.cli import add_weights_arguments, weights_argument
from ssdlite_jax.export import onnx, saved_model, stablehlo, tflite

# each: export(...) -> (file bytes, or a function that fills a directory; metadata extras), and KERNELS
FORMATS = {"stablehlo": stablehlo, "tflite": tflite, "tflite-int8": tflite, "saved_model": saved_model, "onnx": onnx}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_weights_arguments(parser)
  parser.add_argument("--format", required=True, choices=sorted(FORMATS))
  parser.add_argument("--out", required=True, help="file to write (and OUT.json)")
  parser.add_argument("--score-thresh", type=float, default=None, help="default: the model config's (0.001)")
  parser.add_argument("--max-detections", type=int, default=None, help="per image; default: the config's (300)")
  parser.add_argument("--image-size", type=int, default=None, help="SSD: model input side; default: the config's")
  parser.add_argument("--input-size", default=None,
                      help="Faster R-CNN stablehlo: HxW of the images the file will take (default 480x640)")
  parser.add_argument("--calibration-data", default=None,
                      help="tflite-int8: a config file (e.g. configs/synthetic.py) whose data's train split calibrates")
  parser.add_argument("--calibration-images", type=int, default=200, help="tflite-int8: images to calibrate on")
  args = parser.parse_args(argv)
  source = weights_argument(args, parser)
  if (args.format == "tflite-int8") != (args.calibration_data is not None):
    parser.error("--calibration-data is needed for --format tflite-int8, and only there")

  from ssdlite_jax.loading import load_detector  # after argument checks: importing JAX takes a while
  try:
    detector, variables, step = load_detector(source, step=args.step)
    module = FORMATS[args.format]
    if args.format not in detector.EXPORT_FORMATS:
      raise ValueError(f"--format {args.format}: the {detector.config.family!r} family exports to "
                       f"{', '.join(detector.EXPORT_FORMATS)} only")
    detector = export_lib.with_overrides(detector, module.KERNELS, args.score_thresh, args.max_detections,
                                         args.image_size)
    if args.calibration_data:
      calibration = _calibration_images(args.calibration_data, args.calibration_images, detector.image_size)
      data, extras = module.export(detector, variables, calibration=calibration)
      extras["calibration"] = f"{len(calibration)} train images of {args.calibration_data}"
    elif args.input_size:
      if args.format != "stablehlo":
        raise ValueError("--input-size applies to --format stablehlo")
      data, extras = module.export(detector, variables, input_size=_size(args.input_size))
    else:
      data, extras = module.export(detector, variables)
    described = f"{source} (step {step})" if step is not None else source
    meta = export_lib.metadata(detector, described, args.format, **extras)
    if callable(data):
      size = export_lib.write_directory_atomically(args.out, data, meta)
    else:
      export_lib.write_atomically(args.out, data, meta)
      size = len(data)
  except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:   # the last: a format's converter missing
    sys.exit(f"error: {e}")
  print(f"wrote {args.out} ({size / 1e6:.1f} MB, {args.format}) and {args.out}.json")


def _size(text: str):
  """(h, w) of an --input-size 'HxW'."""
  try:
    h, w = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise ValueError(f"--input-size={text}: expected HxW, e.g. 480x640") from None
  if h < 1 or w < 1:
    raise ValueError(f"--input-size={text}: sides must be >= 1")
  return h, w


def load_config(path: str):
  """The ConfigDict of a config file's get_config() (configs/*.py)."""
  import importlib.util
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--calibration-data {path}: no such config file")
  spec = importlib.util.spec_from_file_location("calibration_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _calibration_images(config_path: str, count: int, image_size):
  """[count, H, W, 3] uint8: the first `count` train images of the config file's dataset, as evaluation sees them."""
  from ssdlite_jax.data import pipeline
  if count < 1:
    raise ValueError(f"--calibration-images={count}: must be >= 1")
  return pipeline.calibration_images(pipeline.open_source(load_config(config_path).data), count, image_size)


if __name__ == "__main__":
  main()
