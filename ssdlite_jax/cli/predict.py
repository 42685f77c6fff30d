"""Run a detector on image files.

  python predict.py --torch-weights ssdlite320.pth --output dets.json --draw out/ a.jpg b.png
  python predict.py --checkpoint WORKDIR/checkpoints --output dets.json images/*.jpg
  python predict.py --checkpoint gs://BUCKET/run/checkpoints --output gs://BUCKET/dets.json gs://BUCKET/a.jpg

Writes [{"image": path, "boxes": [[x1, y1, x2, y2], ...] (original pixels), "scores": [...],
"labels": [...]}, ...]; with --draw, copies of the images with boxes, class names and scores above
--min-score. EXIF orientation is applied before detection (boxes refer to the upright image).
"""

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image, ImageOps

from ssdlite_jax import files
from ssdlite_jax.visualize import draw_detections


def read_image(path: str) -> np.ndarray:
  """H x W x 3 uint8 RGB of an image file (EXIF-rotated); a ValueError naming the file if unreadable."""
  try:
    with files.open_file(path, "rb") as f, Image.open(f) as im:
      im.load()
      return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
  except (OSError, SyntaxError, ValueError) as e:
    raise ValueError(f"{path}: cannot read image ({e})") from None


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--checkpoint", help="orbax checkpoint directory (train.py / port_weights.py)")
  src.add_argument("--torch-weights", help="torchvision state_dict (.pth or .safetensors)")
  parser.add_argument("--output", required=True, help="detections JSON to write")
  parser.add_argument("--draw", help="folder for images with detections drawn")
  parser.add_argument("--min-score", type=float, default=0.3, help="drawing threshold")
  parser.add_argument("--skip-unreadable", action="store_true", help="warn and skip unreadable images")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("images", nargs="+")
  args = parser.parse_args(argv)

  images, paths = [], []
  for path in args.images:
    try:
      images.append(read_image(path))
      paths.append(path)
    except ValueError as e:
      if not args.skip_unreadable:
        sys.exit(f"error: {e}")
      print(f"warning: skipped {e}", file=sys.stderr)

  from ssdlite_jax.inference import Predictor  # after argument checks: importing JAX takes a while
  try:
    predictor = (Predictor.from_checkpoint(args.checkpoint, batch_size=args.batch_size) if args.checkpoint
                 else Predictor.from_torch(args.torch_weights, batch_size=args.batch_size))
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  dets = predictor(images)
  records = [{"image": p, "boxes": d["boxes"].tolist(), "scores": d["scores"].tolist(),
              "labels": d["labels"].tolist()} for p, d in zip(paths, dets)]
  files.write_text_atomically(args.output, json.dumps(records))
  print(f"wrote {args.output}: {sum(len(r['scores']) for r in records)} detections in {len(records)} images")
  if args.draw:
    for path, image, det in zip(paths, images, dets):
      out = os.path.join(args.draw, os.path.splitext(os.path.basename(path))[0] + ".jpg")
      drawn = draw_detections(image, det, predictor.class_names, args.min_score)
      files.write_atomically(out, lambda tmp: drawn.save(tmp, quality=92))
    print(f"drew detections with score >= {args.min_score} into {args.draw}/")


if __name__ == "__main__":
  main()
