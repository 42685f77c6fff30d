"""Convergence side by side: ours (train.py) vs torchvision trained on the same data, same recipe, same steps.

  python -m bench.convergence_vs_torchvision [--model ssdlite320_mobilenet_v3_large] [--steps 625] [--batch 8]
                                             [--data_dir ~/tensorflow_datasets]
  python -m bench.convergence_vs_torchvision --model fasterrcnn_mobilenet_v3_large_320_fpn --steps 500 --batch 4

Both train on the embedded synthetic COCO-format folder for the same number of steps and batch size, then both are
evaluated with pycocotools on the val split. Prints a table and one JSON line.
- ssdlite320_mobilenet_v3_large: both from scratch with configs/synthetic.py's recipe (AdamW lr 2e-3, wd 1e-4,
  linear warmup from 0.001x over 100 steps, per-step cosine to 0, `ssdlite` augmentation: RandomIoUCrop +
  horizontal flip).
- fasterrcnn_mobilenet_v3_large_320_fpn: both from the same initial weights (torchvision's weights=None build,
  BatchNorm2d, every layer trained, handed to ours through init_from) with torchvision's recipe
  (configs/fasterrcnn_mobilenet_v3_large_320_fpn.py: SGD lr 0.02 x batch / 16, momentum 0.9, wd 1e-4, linear
  warmup from 0.001x over min(1000, steps per epoch - 1) steps, x0.1 at epochs 16 and 22, horizontal flip).
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


def ssdlite_recipe(model, steps, batch, steps_per_epoch):
  """(train transforms, optimizer, per-step LR factor) of configs/synthetic.py."""
  opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)

  def factor(s):
    w = 0.001 + 0.999 * min(s, 100) / 100
    return w * 0.5 * (1 + math.cos(math.pi * s / steps))
  return [T.RandomIoUCrop(), T.RandomHorizontalFlip(0.5)], opt, factor


def fasterrcnn_recipe(model, steps, batch, steps_per_epoch):
  """(train transforms, optimizer, per-step LR factor) of torchvision's references/detection Faster R-CNN recipe."""
  opt = torch.optim.SGD(model.parameters(), lr=0.02 * batch / 16, momentum=0.9, weight_decay=1e-4)
  warmup = min(1000, steps_per_epoch - 1)

  def factor(s):
    w = 0.001 + 0.999 * s / warmup if s < warmup else 1.0
    return w * 0.1 ** sum(s // steps_per_epoch >= m for m in (16, 22))
  return [T.RandomHorizontalFlip(0.5)], opt, factor


# torchvision builder -> (its recipe, our config, our extra flags)
MODELS = {
    "ssdlite320_mobilenet_v3_large": (ssdlite_recipe, "configs/synthetic.py", []),
    "fasterrcnn_mobilenet_v3_large_320_fpn": (
        fasterrcnn_recipe, "configs/fasterrcnn_mobilenet_v3_large_320_fpn.py",
        ["--config.data.name=synthetic", "--config.model.num_classes=4", "--config.model.frozen_bn=False"]),
}


def train_torchvision(name, root, steps, batch, num_classes, seed, init_path=None):
  """torchvision's `name` trained with its recipe; with init_path, its initial weights are saved there first."""
  torch.manual_seed(seed)
  model = getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None, num_classes=num_classes)
  if init_path:
    torch.save(model.state_dict(), init_path)
  data = CocoFolder(root, "train", None)
  steps_per_epoch = len(data) // batch
  augment, opt, factor = MODELS[name][0](model, steps, batch, steps_per_epoch)
  data.transform = T.Compose(augment + [T.PILToTensor(), T.ToDtype(torch.float, scale=True), T.SanitizeBoundingBoxes()])
  loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, num_workers=1,
                                       collate_fn=lambda b: tuple(zip(*b)), persistent_workers=True)
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


def train_ours(name, data_dir, workdir, steps, batch, seed, init_path=None):
  _, config, flags = MODELS[name]
  cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config", os.path.join(REPO, config),
         "--workdir", workdir, f"--config.data.data_dir={data_dir}", f"--config.max_steps={steps}",
         f"--config.batch_size={batch}", f"--config.seed={seed}", "--config.eval_every_epochs=0",
         f"--config.num_epochs={math.ceil(steps * batch / 1000)}", *flags]
  if init_path:
    cmd.append(f"--config.init_from={init_path}")
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
  parser.add_argument("--model", default="ssdlite320_mobilenet_v3_large", choices=sorted(MODELS))
  parser.add_argument("--steps", type=int, default=625)  # configs/synthetic.py: 5 epochs
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
  parser.add_argument("--workdir", default=None, help="the bench's directory, train.py's workdir under it as run/ "
                      "(default: a new temporary one; an existing run/ would resume instead of training)")
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  root = synthetic.ensure_synthetic(args.data_dir)
  workdir = args.workdir or tempfile.mkdtemp(prefix="convergence_ours_")
  if os.path.exists(os.path.join(workdir, "run", "checkpoints")):
    sys.exit(f"{workdir} already holds checkpoints: train.py would resume; pass a new --workdir")
  # Faster R-CNN: the same initial weights on both sides (torchvision's, written before it trains).
  init_path = os.path.join(workdir, "initial.pth") if args.model.startswith("fasterrcnn") else None
  os.makedirs(workdir, exist_ok=True)
  model, tv_s = train_torchvision(args.model, root, args.steps, args.batch, 4, args.seed, init_path)
  theirs = evaluate_torchvision(model, root)
  ours, ours_s = train_ours(args.model, args.data_dir, os.path.join(workdir, "run"), args.steps, args.batch,
                            args.seed, init_path)
  print(f"\n{args.model}, {args.steps} steps of batch {args.batch}")
  print(f"{'':24s}{'ssdlite-jax':>14s}{'torchvision':>14s}")
  for k in ("AP", "AP50", "AP75", "AR100"):
    print(f"{k:24s}{ours[k]:14.3f}{theirs[k]:14.3f}")
  print(f"{'training wall time (s)':24s}{ours_s:14.0f}{tv_s:14.0f}"
        "   (ours: whole train.py run, compiles and eval included)")
  print(json.dumps({"bench": "convergence_vs_torchvision", "model": args.model, "steps": args.steps,
                    "batch": args.batch,
                    "ours": ours, "torchvision": theirs, "ours_seconds": ours_s, "torchvision_seconds": tv_s}))


if __name__ == "__main__":
  main()
