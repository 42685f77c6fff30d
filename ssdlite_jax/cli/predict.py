"""Run a detector on images: files, folders (searched recursively for image files), glob patterns, http(s) URLs.

  python predict.py --weights ssdlite320_mobilenet_v3_large --out dets.json --draw drawn/ photos/ 'more/*.jpg'
  python predict.py --weights WORKDIR/checkpoints --step best --out dets.json --conf 0 images/a.jpg
  python predict.py --weights gs://BUCKET/run/checkpoints --out gs://BUCKET/dets.json gs://BUCKET/photos/

Writes [{"image": path, "boxes": [[x1, y1, x2, y2], ...] (original pixels), "scores": [...], "labels": [...],
"names": [class name per box]}, ...] with the detections scoring >= --conf (0.25, as Ultralytics; --conf 0 keeps
all of them, up to the model's detections_per_img); with --draw, copies of the images with those boxes drawn,
at their paths relative to the folder (or, for files, their names) they were found under. Images are read, run
and drawn --batch-size at a time. EXIF orientation is applied before detection (boxes refer to the upright image).
"""

import argparse
import glob
import io
import json
import os
import sys
import urllib.parse
import urllib.request
from typing import Iterator, List, Tuple

import numpy as np
from PIL import Image, ImageOps

from ssdlite_jax import files
from ssdlite_jax.cli import add_weights_arguments, deprecated, weights_argument
from ssdlite_jax.visualize import draw_detections

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


def _is_url(path: str) -> bool:
  return path.startswith(("http://", "https://"))


def read_image(path: str) -> np.ndarray:
  """H x W x 3 uint8 RGB of an image file or http(s) URL (EXIF-rotated); a ValueError naming it if unreadable."""
  try:
    if _is_url(path):
      with urllib.request.urlopen(path, timeout=60) as response:
        data = io.BytesIO(response.read())
    else:
      data = files.open_file(path, "rb")
    with data as f, Image.open(f) as im:
      im.load()
      return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
  except (OSError, SyntaxError, ValueError) as e:   # urllib's URLError and HTTPError are OSErrors
    raise ValueError(f"{path}: cannot read image ({getattr(e, 'reason', e)})") from None


def find_images(inputs: List[str]) -> List[Tuple[str, str]]:
  """(path, path relative to where it was found) of each input: a file or URL as given (relative: its name), a
  folder's image files (IMAGE_EXTENSIONS, any depth, sorted), a local glob pattern's matches. A ValueError names
  an input that matches nothing."""
  found = []
  for given in inputs:
    if _is_url(given):
      found.append((given, os.path.basename(urllib.parse.urlparse(given).path) or "image"))
    elif files.isdir(given):
      images = sorted(p for p in files.walk_files(given) if os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS)
      if not images:
        raise ValueError(f"{given}: a folder without image files ({', '.join(IMAGE_EXTENSIONS)})")
      found += [(p, os.path.relpath(p, given)) for p in images]
    elif not files.is_remote(given) and glob.has_magic(given):
      matches = sorted(glob.glob(given, recursive=True))
      if not matches:
        raise ValueError(f"{given}: no file matches this pattern")
      found += [(p, os.path.basename(p)) for p in matches]
    else:
      found.append((given, os.path.basename(given)))
  return found


def _batches(paths: List[Tuple[str, str]], size: int, skip_unreadable: bool) -> Iterator[list]:
  """Lists of up to `size` (path, relative path, image) read in order; unreadable images stop the program or, with
  `skip_unreadable`, are reported and left out."""
  batch = []
  for path, rel in paths:
    try:
      batch.append((path, rel, read_image(path)))
    except ValueError as e:
      if not skip_unreadable:
        sys.exit(f"error: {e}")
      print(f"warning: skipped {e}", file=sys.stderr)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_weights_arguments(parser)
  parser.add_argument("--out", help="detections JSON to write")
  parser.add_argument("--output", help=argparse.SUPPRESS)
  parser.add_argument("--draw", help="folder for images with detections drawn")
  parser.add_argument("--conf", type=float, default=0.25, help="keep detections scoring >= this (0: all)")
  parser.add_argument("--min-score", type=float, help="deprecated: --conf, which now filters the JSON too")
  parser.add_argument("--skip-unreadable", action="store_true", help="warn and skip unreadable images")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("images", nargs="+", help="image files, folders, glob patterns, http(s) URLs")
  args = parser.parse_args(argv)
  weights = weights_argument(args, parser)
  if args.output:
    deprecated("--output", "--out")
    args.out = args.out or args.output
  if not args.out:
    parser.error("--out (the detections JSON to write) is required")
  if args.min_score is not None:
    deprecated("--min-score", "--conf (it filters the JSON too)")
    args.conf = args.min_score
  try:
    paths = find_images(args.images)
  except ValueError as e:
    sys.exit(f"error: {e}")

  from ssdlite_jax.inference import Predictor  # after argument checks: importing JAX takes a while
  from ssdlite_jax.loading import load_detector
  try:
    predictor = Predictor(*load_detector(weights, step=args.step)[:2], batch_size=args.batch_size)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  names = predictor.class_names
  records = []
  for batch in _batches(paths, args.batch_size, args.skip_unreadable):
    for (path, rel, image), det in zip(batch, predictor([image for _, _, image in batch])):
      keep = det["scores"] >= args.conf
      det = {k: v[keep] for k, v in det.items()}
      records.append({"image": path, "boxes": det["boxes"].tolist(), "scores": det["scores"].tolist(),
                      "labels": det["labels"].tolist(), "names": [names[i] for i in det["labels"]]})
      if args.draw:
        drawn = draw_detections(image, det, names, args.conf)
        out = os.path.join(args.draw, os.path.splitext(rel)[0] + ".jpg")
        files.write_atomically(out, lambda tmp: drawn.save(tmp, format="JPEG", quality=92))
  files.write_text_atomically(args.out, json.dumps(records))
  print(f"wrote {args.out}: {sum(len(r['scores']) for r in records)} detections scoring >= {args.conf} in "
        f"{len(records)} images" + (f"; drawn into {args.draw}/" if args.draw else ""))


if __name__ == "__main__":
  main()
