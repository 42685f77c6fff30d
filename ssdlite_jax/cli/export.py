"""Export a trained detector for deployment, post-processing included.

  python export.py --checkpoint runs/mine/checkpoints --format stablehlo --out mine.jaxexport
  python export.py --torch-weights ssdlite320.pth --format tflite --out coco.tflite --score-thresh 0.3

Writes OUT and OUT.json (metadata: classes, input/output layout, post-processing). Formats: stablehlo
(jax.export, batch-polymorphic; ssdlite_jax/export/stablehlo.py says how to run it) and tflite (LiteRT float32,
batch 1, the 4-output SSD layout; ssdlite_jax/export/tflite.py).
"""

import argparse
import sys

from ssdlite_jax import export as export_lib
from ssdlite_jax.export import stablehlo, tflite

FORMATS = {"stablehlo": stablehlo, "tflite": tflite}   # each: export(detector, variables), KERNELS


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--checkpoint", help="orbax checkpoint directory (train.py / port_weights.py)")
  src.add_argument("--torch-weights", help="torchvision state_dict (.pth or .safetensors)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  parser.add_argument("--format", required=True, choices=sorted(FORMATS))
  parser.add_argument("--out", required=True, help="file to write (and OUT.json)")
  parser.add_argument("--score-thresh", type=float, default=None, help="default: the model config's (0.001)")
  parser.add_argument("--max-detections", type=int, default=None, help="per image; default: the config's (300)")
  parser.add_argument("--image-size", type=int, default=None, help="model input side; default: the config's")
  args = parser.parse_args(argv)

  from ssdlite_jax.loading import load_detector  # after argument checks: importing JAX takes a while
  try:
    if args.torch_weights and args.step is not None:
      raise ValueError("--step applies to --checkpoint, not to --torch-weights")
    source = args.checkpoint or args.torch_weights
    detector, variables, step = load_detector(source, step=args.step)
    module = FORMATS[args.format]
    detector = export_lib.with_overrides(detector, module.KERNELS, args.score_thresh, args.max_detections,
                                         args.image_size)
    data, extras = module.export(detector, variables)
    described = f"{source} (step {step})" if step is not None else source
    export_lib.write_atomically(args.out, data, export_lib.metadata(detector, described, args.format, **extras))
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(f"wrote {args.out} ({len(data) / 1e6:.1f} MB, {args.format}) and {args.out}.json")


if __name__ == "__main__":
  main()
