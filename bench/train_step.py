"""Training throughput: our jitted train step vs torchvision's (CPU or any backend), any of common.BUILDERS.

  python -m bench.train_step [--model ssdlite320_mobilenet_v3_large | ssd300_vgg16 |
                              fasterrcnn_mobilenet_v3_large_320_fpn | fasterrcnn_mobilenet_v3_large_fpn]
                             [--batch 24] [--steps 5]
                             [--num_classes 91] [--kernels auto] [--dtype float32] [--amp] [--channels_last]

Each framework runs in its own subprocess (so the RSS high-water marks are separable) on the same synthetic
batch (square images at the model's input size or min_size, so torchvision's resize is the identity; 1-4 boxes per
image; Faster R-CNN as weights=None builds it, BatchNorm2d and every layer trained), same
thread count. Measured: forward + loss + backward + SGD(momentum 0.9, wd 4e-5) update; median over --steps steps after
--warmup steps; our compile time (lower + compile of the step) and the device memory the compiled step
needs; torchvision's peak CUDA memory on a GPU, optionally under bf16 autocast and channels_last (its GPU
recipe). Prints a table and one JSON line.
"""

import argparse
import json
import os
import time

from bench import common


def worker_torch(args):
  import contextlib
  import torch
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  model = common.torchvision_detector(args.model, args.num_classes).train().to(device)
  size = model.transform.min_size[0]
  images, boxes, labels, mask = common.synthetic_train_batch(args.batch, size, args.num_classes, seed=args.seed)
  if args.channels_last:
    model = model.to(memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5)
  imgs = [torch.from_numpy(im.transpose(2, 0, 1).copy()).to(device) for im in images]
  targets = [{"boxes": torch.from_numpy(boxes[b][mask[b]]).to(device),
              "labels": torch.from_numpy(labels[b][mask[b]]).long().to(device)} for b in range(args.batch)]
  autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp else contextlib.nullcontext
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()

  def step():
    opt.zero_grad(set_to_none=True)
    with autocast():
      loss = sum(model(imgs, targets).values())
    loss.backward()
    opt.step()
    return float(loss)   # synchronises with the device

  times = common.time_calls(step, args.steps, args.warmup)
  return {"framework": "torchvision", "device": device.type, "threads": torch.get_num_threads(),
          "amp_bf16": bool(args.amp), "channels_last": bool(args.channels_last), "step_s": common.median(times),
          "step_times_s": [round(t, 4) for t in times], "peak_rss_mb": common.peak_rss_mb(),
          "peak_device_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None}


def worker_jax(args):
  import jax
  import numpy as np
  from ssdlite_jax.zoo import build_model
  from ssdlite_jax.distributed import make_mesh, shard_batch
  from ssdlite_jax.train_step import create_train_state, make_train_step
  cfg = common.our_model_config(args.model, args.num_classes)
  cfg.kernels = args.kernels
  cfg.dtype = args.dtype
  detector = build_model(cfg)
  tx, schedule = common.recipe_optimizer(args.batch)
  mesh = make_mesh(jax.devices()[:1])
  state = create_train_state(detector, tx, jax.random.key(0), mesh)
  size = common.input_side(cfg)
  images, boxes, labels, mask = common.synthetic_train_batch(args.batch, size, args.num_classes, seed=args.seed)
  batch = dict(image=images, boxes=boxes, labels=labels, mask=mask, image_size=np.full((args.batch, 2), size, np.int32))
  batch = shard_batch({k: batch[k] for k in detector.BATCH_KEYS}, mesh)
  step = make_train_step(detector, tx, schedule, mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()   # the compiled step's device buffers (None where the backend has none)
  cost = compiled.cost_analysis()       # XLA's count for the whole step: a dict (a list of one on older jax)
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch)
    return float(jax.block_until_ready(metrics["loss"]))

  times = common.time_calls(run, args.steps, args.warmup)
  return {"framework": "ours", "backend": jax.default_backend(), "kernels": detector.kernels,
          "dtype": args.dtype, "step_s": common.median(times), "step_times_s": [round(t, 4) for t in times],
          "compile_s": compile_s, "peak_rss_mb": common.peak_rss_mb(), "loss": run(),
          "device_mb": _step_megabytes(memory), "flops_per_image": cost.get("flops", 0.0) / args.batch,
          "bytes_per_image": cost.get("bytes accessed", 0.0) / args.batch}


def _step_megabytes(memory):
  """Device memory the compiled step needs: arguments + outputs + temporaries - donated (aliased) bytes, MiB."""
  if memory is None:
    return None
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
           - memory.alias_size_in_bytes)
  return total / 2 ** 20


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="ssdlite320_mobilenet_v3_large", choices=common.BUILDERS)
  p.add_argument("--batch", type=int, default=24, help="per-device batch")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--num_classes", type=int, default=91)
  p.add_argument("--kernels", default="auto", help="model.kernels: auto | cpu | xla")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--amp", action="store_true", help="torchvision under bfloat16 autocast")
  p.add_argument("--channels_last", action="store_true", help="torchvision in channels_last memory format")
  common.add_worker_flags(p)
  args = p.parse_args()
  fwd = ["--model", args.model, "--batch", args.batch, "--steps", args.steps, "--warmup", args.warmup, "--num_classes",
         args.num_classes, "--kernels", args.kernels, "--dtype", args.dtype, "--seed", args.seed]
  fwd += ["--amp"] * args.amp + ["--channels_last"] * args.channels_last
  results = common.ours_and_torchvision(__spec__.name, args, fwd, worker_jax, worker_torch)
  if results is None:
    return
  ours, tv = results
  ips = lambda r: args.batch / r["step_s"] if r else float("nan")
  size = common.input_side(common.our_model_config(args.model, args.num_classes))
  print(f"{args.model} train step, batch {args.batch}, {size}x{size}, {args.num_classes} classes, "
        f"{os.cpu_count()} CPUs")
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
    print(f"{'XLA GFLOP / image':<22}{ours['flops_per_image'] / 1e9:>12.2f}  (forward + backward + update)")
    print(f"{'XLA MB accessed / img':<22}{ours['bytes_per_image'] / 1e6:>12.1f}")
  result = {"bench": "train_step", "model": args.model, "batch": args.batch, "num_classes": args.num_classes,
            "cpus": os.cpu_count(), "ours": ours, "torchvision": tv,
            "throughput_ratio": (ips(ours) / ips(tv)) if (ours and tv) else None}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
