"""Run a detector on images and videos: files, folders (searched at any depth for image and video files), glob
patterns, http(s) URLs.

  python predict.py --weights ssdlite320_mobilenet_v3_large --out dets.json --draw drawn/ photos/ 'more/*.jpg'
  python predict.py --weights WORKDIR/checkpoints --step best --out dets.json --conf 0 images/a.jpg
  python predict.py --weights gs://BUCKET/run/checkpoints --out gs://BUCKET/dets.json gs://BUCKET/photos/
  python predict.py --weights ssdlite320_mobilenet_v3_large --out dets.json --draw drawn/ clip.mp4

Writes [{"image": path, "boxes": [[x1, y1, x2, y2], ...] (original pixels), "scores": [...], "labels": [...],
"names": [class name per box]}, ...], one record per image or video frame (with "frame": its 0-based index), with
the detections scoring >= --conf (0.25, as Ultralytics; --conf 0 keeps all of them, up to the model's
detections_per_img); with --draw, copies with those boxes drawn (images as .jpg, videos as H.264 .mp4 at their frame
rate) at their paths relative to the folder (or, for files, their names) they were found under. Images and frames
are decoded, run, drawn and written --batch-size at a time, so memory does not grow with their number. EXIF
orientation and a video's display rotation are applied before detection (boxes refer to the upright picture).
"""

import argparse
import contextlib
import json
import sys
from typing import Iterable, Iterator, List

from ssdlite_jax import files, media
from ssdlite_jax.cli import add_weights_arguments, deprecated, weights_argument
from ssdlite_jax.visualize import draw_detections


def _batches(items: Iterable, size: int) -> Iterator[List]:
  """Lists of up to `size` consecutive items, each taken from `items` only when its batch is being filled."""
  batch = []
  for item in items:
    batch.append(item)
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
  parser.add_argument("--skip-unreadable", action="store_true", help="warn and skip unreadable images and videos")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("images", nargs="+", help="image and video files, folders, glob patterns, http(s) URLs")
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
    found = media.find(args.images)
  except ValueError as e:
    sys.exit(f"error: {e}")

  from ssdlite_jax.inference import Predictor  # after argument checks: importing JAX takes a while
  from ssdlite_jax.loading import load_detector
  try:
    predictor = Predictor(*load_detector(weights, step=args.step)[:2], batch_size=args.batch_size)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  names = predictor.class_names

  def unreadable(error):
    if not args.skip_unreadable:
      sys.exit(f"error: {error}")
    print(f"warning: skipped {error}", file=sys.stderr)

  images = frames = detections = 0
  # The JSON (one record per line) and the drawings are written as the batches are run: memory holds one batch.
  with files.writing(args.out) as tmp, open(tmp, "w") as out, \
       media.Drawings(args.draw) if args.draw else contextlib.nullcontext() as drawings:
    out.write("[")
    for batch in _batches(media.read(found, unreadable), args.batch_size):
      for picture, det in zip(batch, predictor([p.image for p in batch])):
        keep = det["scores"] >= args.conf
        det = {k: v[keep] for k, v in det.items()}
        record = {"image": picture.path, **({} if picture.frame is None else {"frame": picture.frame}),
                  "boxes": det["boxes"].tolist(), "scores": det["scores"].tolist(), "labels": det["labels"].tolist(),
                  "names": [names[i] for i in det["labels"]]}
        out.write(("\n" if images + frames == 0 else ",\n") + json.dumps(record))
        images, frames = images + (picture.frame is None), frames + (picture.frame is not None)
        detections += len(record["scores"])
        if drawings:
          drawings.add(picture, draw_detections(picture.image, det, names, args.conf))
    out.write("\n]\n")
  print(f"wrote {args.out}: {detections} detections scoring >= {args.conf} in {images} images"
        + (f" and {frames} video frames" if frames else "") + (f"; drawn into {args.draw}/" if args.draw else ""))


if __name__ == "__main__":
  main()
