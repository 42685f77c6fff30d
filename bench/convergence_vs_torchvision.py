"""Convergence side by side: ours (train.py) vs torchvision's ssdlite320 trained on the same data.

  python -m bench.convergence_vs_torchvision [--steps 625] [--batch 8] [--data_dir ~/tensorflow_datasets]

Both train from scratch on the embedded synthetic COCO-format folder with the same recipe as
configs/synthetic.py (AdamW lr 2e-3, wd 1e-4, linear warmup from 0.001x over 100 steps, per-step cosine to 0,
`ssdlite` augmentation: RandomIoUCrop + horizontal flip) for the same number of steps and batch size, then
both are evaluated with pycocotools on the val split. Prints a table and one JSON line.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch  # before TensorFlow (imported by the data package): the reverse order segfaults
import torchvision
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2 as T

from ssdlite_jax.data import synthetic
from ssdlite_jax.evaluation import coco_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CocoFolder(torch.utils.data.Dataset):
  """COCO json + images -> (float image [3, H, W] in [0, 1], {"boxes" xyxy, "labels" 1..N}) as torchvision's
  references do (crowd dropped, clamped, degenerate dropped; labels contiguous in category-id order)."""

  def __init__(self, root, split, transform):
    with open(os.path.join(root, "annotations", f"instances_{split}.json")) as f:
      gt = json.load(f)
    self.root, self.split, self.transform = root, split, transform
    self.images = gt["images"]
    self.cat_ids = sorted(c["id"] for c in gt["categories"])
    by_image = {}
    for a in gt["annotations"]:
      by_image.setdefault(a["image_id"], []).append(a)
    self.anns = [by_image.get(im["id"], []) for im in self.images]

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    im = self.images[i]
    image = Image.open(os.path.join(self.root, self.split, im["file_name"])).convert("RGB")
    w, h = image.size
    boxes, labels = [], []
    for a in self.anns[i]:
      if a.get("iscrowd", 0):
        continue
      x, y, bw, bh = a["bbox"]
      box = [min(max(x, 0), w), min(max(y, 0), h), min(max(x + bw, 0), w), min(max(y + bh, 0), h)]
      if box[2] > box[0] and box[3] > box[1]:
        boxes.append(box)
        labels.append(self.cat_ids.index(a["category_id"]) + 1)
    target = {"boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                                 format="XYXY", canvas_size=(h, w)),
              "labels": torch.tensor(labels, dtype=torch.int64), "image_id": im["id"]}
    return self.transform(image, target)


def train_torchvision(root, steps, batch, num_classes, seed):
  torch.manual_seed(seed)
  model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
      weights=None, weights_backbone=None, num_classes=num_classes)
  train_tf = T.Compose([T.RandomIoUCrop(), T.RandomHorizontalFlip(0.5), T.PILToTensor(),
                        T.ToDtype(torch.float, scale=True), T.SanitizeBoundingBoxes()])
  data = CocoFolder(root, "train", train_tf)
  loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, num_workers=1,
                                       collate_fn=lambda b: tuple(zip(*b)), persistent_workers=True)
  opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
  warmup = 100

  def factor(s):
    w = 0.001 + 0.999 * min(s, warmup) / warmup
    return w * 0.5 * (1 + math.cos(math.pi * s / steps))
  sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
  model.train()
  step, t0 = 0, time.time()
  while step < steps:
    for images, targets in loader:
      losses = model(list(images), [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
      loss = sum(losses.values())
      opt.zero_grad()
      loss.backward()
      opt.step()
      sched.step()
      step += 1
      if step % 50 == 0:
        print(f"torchvision step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
      if step == steps:
        break
  return model, time.time() - t0


def evaluate_torchvision(model, root):
  data = CocoFolder(root, "val", T.Compose([T.PILToTensor(), T.ToDtype(torch.float, scale=True)]))
  model.eval()
  results = []
  with torch.inference_mode():
    for i in range(len(data)):
      image, target = data[i]
      det = model([image])[0]
      for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
        results.append({"image_id": target["image_id"], "category_id": data.cat_ids[label - 1],
                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score})
  return coco_metrics(results, os.path.join(root, "annotations", "instances_val.json"))


def train_ours(data_dir, workdir, steps, batch, seed):
  cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config", os.path.join(REPO, "configs/synthetic.py"),
         "--workdir", workdir, f"--config.data.data_dir={data_dir}", f"--config.max_steps={steps}",
         f"--config.batch_size={batch}", f"--config.seed={seed}", "--config.eval_every_epochs=0",
         f"--config.num_epochs={math.ceil(steps * batch / 1000)}"]
  t0 = time.time()
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode:
    sys.exit(f"train.py failed:\n{proc.stderr[-3000:]}")
  elapsed = time.time() - t0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [json.loads(line) for line in f if '"eval/AP"' in line]
  return {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval/")}, elapsed


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=625)  # configs/synthetic.py: 5 epochs
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
  parser.add_argument("--workdir", default=None, help="train.py workdir (default: a new temporary one; an "
                      "existing workdir would resume instead of training)")
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  root = synthetic.ensure_synthetic(args.data_dir)
  workdir = args.workdir or tempfile.mkdtemp(prefix="convergence_ours_")
  if os.path.exists(os.path.join(workdir, "checkpoints")):
    sys.exit(f"{workdir} already holds checkpoints: train.py would resume; pass a new --workdir")
  ours, ours_s = train_ours(args.data_dir, workdir, args.steps, args.batch, args.seed)
  model, tv_s = train_torchvision(root, args.steps, args.batch, 4, args.seed)
  theirs = evaluate_torchvision(model, root)
  print(f"\n{'':24s}{'ssdlite-jax':>14s}{'torchvision':>14s}")
  for k in ("AP", "AP50", "AP75", "AR100"):
    print(f"{k:24s}{ours[k]:14.3f}{theirs[k]:14.3f}")
  print(f"{'training wall time (s)':24s}{ours_s:14.0f}{tv_s:14.0f}"
        "   (ours: whole train.py run, compiles and eval included)")
  print(json.dumps({"bench": "convergence_vs_torchvision", "steps": args.steps, "batch": args.batch,
                    "ours": ours, "torchvision": theirs, "ours_seconds": ours_s, "torchvision_seconds": tv_s}))


if __name__ == "__main__":
  main()
