"""Training throughput: our jitted train step vs torchvision's ssdlite320_mobilenet_v3_large (CPU or any backend).

  python -m bench.train_step [--batch 24] [--steps 5] [--num_classes 91] [--kernels auto]

Each framework runs in its own subprocess (so the RSS high-water marks are separable) on the same synthetic
batch (320x320 images, so torchvision's resize is the identity; 1-4 boxes per image), same thread count.
Measured: forward + loss + backward + SGD(momentum 0.9, wd 4e-5) update; median over --steps steps after
--warmup steps; our compile time (lower + compile of the step). Prints a table and one JSON line.
"""

import argparse
import json
import os
import time

from bench import common


def worker_torch(args):
  import torch
  import torchvision
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  images, boxes, labels, mask = common.synthetic_train_batch(args.batch, 320, args.num_classes, seed=args.seed)
  model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
      weights=None, weights_backbone=None, num_classes=args.num_classes).train()
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5)
  imgs = [torch.from_numpy(im.transpose(2, 0, 1).copy()) for im in images]
  targets = [{"boxes": torch.from_numpy(boxes[b][mask[b]]), "labels": torch.from_numpy(labels[b][mask[b]]).long()}
             for b in range(args.batch)]

  def step():
    opt.zero_grad(set_to_none=True)
    loss = sum(model(imgs, targets).values())
    loss.backward()
    opt.step()
    return float(loss)

  times = common.time_calls(step, args.steps, args.warmup)
  return {"framework": "torchvision", "threads": torch.get_num_threads(), "step_s": common.median(times),
          "step_times_s": [round(t, 4) for t in times], "peak_rss_mb": common.peak_rss_mb()}


def worker_jax(args):
  import jax
  from ssdlite_jax import optim
  from ssdlite_jax.models import build_model, default_model_config
  from ssdlite_jax.distributed import make_mesh, shard_batch
  from ssdlite_jax.train_step import create_train_state, make_train_step
  cfg = default_model_config()
  cfg.num_classes = args.num_classes
  cfg.kernels = args.kernels
  cfg.dtype = args.dtype
  detector = build_model(cfg)
  ocfg = optim.default_optim_config()
  ocfg.batch_size = args.batch
  tx, schedule = optim.make_optimizer(ocfg, steps_per_epoch=1000)
  mesh = make_mesh(jax.devices()[:1])
  state = create_train_state(detector, tx, jax.random.PRNGKey(0), mesh)
  images, boxes, labels, mask = common.synthetic_train_batch(args.batch, 320, args.num_classes, seed=args.seed)
  batch = shard_batch(dict(image=images, boxes=boxes, labels=labels, mask=mask), mesh)
  step = make_train_step(detector, tx, schedule, mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch)
    return float(jax.block_until_ready(metrics["loss"]))

  times = common.time_calls(run, args.steps, args.warmup)
  return {"framework": "ours", "backend": jax.default_backend(), "kernels": detector.kernels,
          "dtype": args.dtype, "step_s": common.median(times), "step_times_s": [round(t, 4) for t in times],
          "compile_s": compile_s, "peak_rss_mb": common.peak_rss_mb(), "loss": run()}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=24, help="per-device batch")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--num_classes", type=int, default=91)
  p.add_argument("--kernels", default="auto", help="model.kernels: auto | cpu | xla")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--seed", type=int, default=0)
  common.add_worker_flags(p)
  args = p.parse_args()
  fwd = ["--batch", args.batch, "--steps", args.steps, "--warmup", args.warmup, "--num_classes",
         args.num_classes, "--kernels", args.kernels, "--dtype", args.dtype, "--seed", args.seed]
  results = common.ours_and_torchvision(__spec__.name, args, fwd, worker_jax, worker_torch)
  if results is None:
    return
  ours, tv = results
  ips = lambda r: args.batch / r["step_s"] if r else float("nan")
  print(f"train step, batch {args.batch}, 320x320, {args.num_classes} classes, {os.cpu_count()} CPUs")
  print(f"{'':<22}{'ours':>12}{'torchvision':>14}{'ratio':>10}")
  def row(name, a, b, fmt="{:.1f}"):
    ratio = a / b if (a == a and b == b and b) else float("nan")
    print(f"{name:<22}{fmt.format(a):>12}{fmt.format(b):>14}{ratio:>10.2f}")
  nan = float("nan")
  row("step ms (median)", ours["step_s"] * 1e3 if ours else nan, tv["step_s"] * 1e3 if tv else nan)
  row("images/s", ips(ours), ips(tv))
  row("peak RSS MiB", ours["peak_rss_mb"] if ours else nan, tv["peak_rss_mb"] if tv else nan, "{:.0f}")
  if ours:
    print(f"{'compile s (ours)':<22}{ours['compile_s']:>12.1f}")
  result = {"bench": "train_step", "batch": args.batch, "num_classes": args.num_classes, "cpus": os.cpu_count(),
            "ours": ours, "torchvision": tv,
            "throughput_ratio": (ips(ours) / ips(tv)) if (ours and tv) else None}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
