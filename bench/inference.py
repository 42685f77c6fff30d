"""End-to-end inference: our Predictor vs torchvision's model in eval mode, CPU or any backend.

  python -m bench.inference [--model ssdlite320_mobilenet_v3_large | ssd300_vgg16
                             | fasterrcnn_mobilenet_v3_large_320_fpn | fasterrcnn_mobilenet_v3_large_fpn]
                            [--runs 30] [--throughput_batch 32] [--num_classes 91]

uint8 480x640 RGB images -> detections, resize and NMS included: batch-1 latency (median of --runs calls after
warm-up) and images/s at --throughput_batch; torchvision in eval mode under torch.inference_mode with the
uint8 -> float conversion inside the timing, same thread count (each framework in its own subprocess).
Also: our compile time per batch size, and for an SSD the post-processing share (the jitted postprocess alone on
real head outputs of the benchmark images, relative to our batch-1 end-to-end latency). Weights are random (fresh
init): for SSDlite scores are near 1/num_classes > score_thresh 0.001, so every class keeps 300 candidates for
NMS in both frameworks (the worst case for post-processing); for Faster R-CNN every RPN proposal passes its 0.05
threshold (1000 / 150 RoIs through the box head, as with trained weights) and no detection its 0.05 (torchvision
then skips the per-class NMS; ours runs its fixed-shape loop either way). Ours uses FrozenBatchNorm, torchvision's
weights=None build BatchNorm2d: the same eval-mode arithmetic.
Prints a table and one JSON line.
"""

import argparse
import json
import os
import time

from bench import common


def worker_torch(args):
  import torch
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  model = common.torchvision_detector(args.model, args.num_classes).eval().to(device)
  images = common.synthetic_uint8_images(max(args.throughput_batch, 1), 480, 640, seed=args.seed)

  def run(batch):
    with torch.inference_mode():
      x = [torch.from_numpy(im).to(device).permute(2, 0, 1).float().div_(255.0) for im in batch]
      out = model(x)
    return [{k: v.cpu().numpy() for k, v in o.items()} for o in out]   # .cpu() synchronises

  lat = common.time_calls(lambda: run(images[:1]), args.runs, 3)
  thr = common.time_calls(lambda: run(images[:args.throughput_batch]), args.throughput_runs, 1)
  nd = len(run(images[:1])[0]["scores"])
  return {"framework": "torchvision", "device": device.type, "threads": torch.get_num_threads(),
          "latency_s": common.median(lat),
          "latency_min_s": min(lat), "throughput_batch": args.throughput_batch,
          "throughput_ips": args.throughput_batch / common.median(thr), "detections_bs1": nd,
          "peak_rss_mb": common.peak_rss_mb()}


def _ssd_split(detector, variables, images, runs):
  """An SSD's network and post-processing times at batch 1 (postprocess alone on real head outputs)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from ssdlite_jax.ssd import postprocess
  x = detector.transform(jnp.asarray(images[:1]), detector.prepare([(480, 640)]))
  out = jax.jit(lambda v, x: detector.module.apply(v, x, train=False))(variables, x)
  post = jax.jit(lambda cl, br, sz: postprocess.postprocess(cl, br, jnp.asarray(detector.anchors), sz,
                                                           detector.image_size, **detector.postprocess_kwargs()))
  sizes = np.array([[480, 640]], np.int32)
  jax.block_until_ready(post(out["cls_logits"], out["bbox_regression"], sizes))
  post_t = common.time_calls(lambda: jax.block_until_ready(post(out["cls_logits"], out["bbox_regression"], sizes)),
                             runs, 2)
  net = jax.jit(lambda v, x: detector.module.apply(v, x, train=False))
  net_t = common.time_calls(lambda: jax.block_until_ready(net(variables, x)), runs, 2)
  return {"postprocess_s": common.median(post_t), "network_s": common.median(net_t)}


def worker_jax(args):
  import jax
  from ssdlite_jax.inference import Predictor
  from ssdlite_jax.zoo import build_model
  detector = build_model(common.our_model_config(args.model, args.num_classes))
  variables = detector.init(jax.random.key(0))
  images = common.synthetic_uint8_images(max(args.throughput_batch, 1), 480, 640, seed=args.seed)
  pred1 = Predictor(detector, variables, batch_size=1)
  predn = Predictor(detector, variables, batch_size=args.throughput_batch)
  t0 = time.perf_counter()
  pred1(list(images[:1]))
  compile1 = time.perf_counter() - t0
  t0 = time.perf_counter()
  predn(list(images[:args.throughput_batch]))
  compilen = time.perf_counter() - t0
  lat = common.time_calls(lambda: pred1(list(images[:1])), args.runs, 3)
  thr = common.time_calls(lambda: predn(list(images[:args.throughput_batch])), args.throughput_runs, 1)
  nd = len(pred1(list(images[:1]))[0]["scores"])
  split = _ssd_split(detector, variables, images, args.runs) if detector.config.family == "ssd" else {}
  if split:
    split["postprocess_share"] = split["postprocess_s"] / common.median(lat)
  return {"framework": "ours", "backend": jax.default_backend(), "latency_s": common.median(lat),
          "latency_min_s": min(lat), "throughput_batch": args.throughput_batch,
          "throughput_ips": args.throughput_batch / common.median(thr), "compile_bs1_s": compile1,
          f"compile_bs{args.throughput_batch}_s": compilen, **split,
          "detections_bs1": nd, "peak_rss_mb": common.peak_rss_mb()}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="ssdlite320_mobilenet_v3_large", choices=common.BUILDERS)
  p.add_argument("--runs", type=int, default=30)
  p.add_argument("--throughput_batch", type=int, default=32)
  p.add_argument("--throughput_runs", type=int, default=3)
  p.add_argument("--num_classes", type=int, default=91)
  p.add_argument("--seed", type=int, default=0)
  common.add_worker_flags(p)
  args = p.parse_args()
  fwd = ["--model", args.model, "--runs", args.runs, "--throughput_batch", args.throughput_batch, "--throughput_runs",
         args.throughput_runs, "--num_classes", args.num_classes, "--seed", args.seed]
  results = common.ours_and_torchvision(__spec__.name, args, fwd, worker_jax, worker_torch)
  if results is None:
    return
  ours, tv = results
  nan = float("nan")
  g = lambda r, k, s=1.0: r[k] * s if r else nan
  print(f"{args.model} inference, uint8 480x640 -> detections, {args.num_classes} classes, {os.cpu_count()} CPUs")
  print(f"{'':<28}{'ours':>10}{'torchvision':>14}{'ratio':>8}")
  for name, k, s in [("latency bs1 ms (median)", "latency_s", 1e3),
                     (f"throughput bs{args.throughput_batch} img/s", "throughput_ips", 1.0),
                     ("peak RSS MiB", "peak_rss_mb", 1.0)]:
    a, b = g(ours, k, s), g(tv, k, s)
    print(f"{name:<28}{a:>10.1f}{b:>14.1f}{(a / b if b == b and b else nan):>8.2f}")
  if ours and "network_s" in ours:
    print(f"{'network only bs1 ms':<28}{ours['network_s'] * 1e3:>10.1f}")
    print(f"{'postprocess bs1 ms':<28}{ours['postprocess_s'] * 1e3:>10.1f}  "
          f"({ours['postprocess_share'] * 100:.0f}% of end-to-end)")
  if ours:
    print(f"{'compile s bs1 / bs' + str(args.throughput_batch):<28}{ours['compile_bs1_s']:>10.1f}"
          f"{ours['compile_bs%d_s' % args.throughput_batch]:>14.1f}")
  print(json.dumps({"bench": "inference", "model": args.model, "image": [480, 640], "num_classes": args.num_classes,
                    "cpus": os.cpu_count(), "ours": ours, "torchvision": tv,
                    "latency_ratio": (ours["latency_s"] / tv["latency_s"]) if ours and tv else None,
                    "throughput_ratio": (ours["throughput_ips"] / tv["throughput_ips"]) if ours and tv else None}))


if __name__ == "__main__":
  main()
