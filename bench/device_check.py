"""The one-shot accelerator check (run through bench/device_check.sh): every figure in one JSON file.

  python -m bench.device_check OUTDIR [--smoke]

Ours (one process): the train step in float32 and bfloat16 (model.dtype; kernels 'auto', i.e. XLA's on a GPU)
at each per-device batch, with compile time and the device memory of the compiled step; inference (uint8
480x640 -> detections) at batch 1 and the throughput batch; then --curve_steps SGD steps in each dtype from the
same initial weights over the same fixed synthetic batches (the bf16 loss curve must track the float32 one).
torchvision (a second process): its train step under bf16 autocast in channels_last at the same batches, with
peak CUDA memory, and its inference. The train and inference figures come from bench/train_step.py's and
bench/inference.py's workers, so they are the same measurements as those scripts make.
--smoke: tiny batches and step counts, for debugging the check on a CPU before GPU time is spent.
"""

import argparse
import json
import os
import platform
import sys
import time
import types

from bench import common, inference, train_step

# One per-device batch by default: on the H200 (jax 0.11.2, CUDA 13) the step compiles in 54 s (float32) and
# 127 s (bfloat16), so three batches in two dtypes do not fit a 15-minute window (--batches 24,64,128 for longer).
FULL = dict(batches=(64,), steps=10, warmup=3, runs=30, throughput_batch=64, throughput_runs=5,
            curve_steps=100, curve_batch=64)
# --smoke checks that every figure is produced, not the figures: one timed step and no warm-up (on a 2-core CPU
# torchvision's bf16-autocast step alone takes 30-80 s at batch 2).
SMOKE = dict(batches=(2,), steps=1, warmup=0, runs=3, throughput_batch=2, throughput_runs=1,
             curve_steps=3, curve_batch=2)


def _train_args(batch, sizes, **overrides):
  args = dict(model="ssdlite320_mobilenet_v3_large", batch=batch, steps=sizes["steps"], warmup=sizes["warmup"],
              num_classes=91, kernels="auto", dtype="float32", seed=0, amp=False, channels_last=False)
  return types.SimpleNamespace(**dict(args, **overrides))


def _inference_args(sizes):
  return types.SimpleNamespace(model="ssdlite320_mobilenet_v3_large", runs=sizes["runs"],
                               throughput_batch=sizes["throughput_batch"], throughput_runs=sizes["throughput_runs"],
                               num_classes=91, seed=0)


def loss_curves(num_steps: int, batch: int, num_batches: int = 4):
  """{dtype: [loss per step]}: `num_steps` SGD steps (common.recipe_optimizer, as the timed steps: at batch
  sizes["batches"][0] the same program) cycling over `num_batches` fixed synthetic batches, from the same float32
  initial weights in each dtype."""
  import jax
  from ssdlite_jax.distributed import make_mesh, shard_batch
  from ssdlite_jax.zoo import build_model
  from ssdlite_jax.ssd.configs import ssdlite320_config
  from ssdlite_jax.train_step import create_train_state, make_train_step
  mesh = make_mesh(jax.devices()[:1])
  config = ssdlite320_config()
  variables = jax.device_get(build_model(config).init(jax.random.key(0)))
  data = []
  for seed in range(num_batches):
    images, boxes, labels, mask = common.synthetic_train_batch(batch, 320, seed=100 + seed)
    data.append(shard_batch(dict(image=images, boxes=boxes, labels=labels, mask=mask), mesh))
  tx, schedule = common.recipe_optimizer(batch)
  curves = {}
  for dtype in ("float32", "bfloat16"):
    config.dtype = dtype
    det = build_model(config)
    state = create_train_state(det, tx, jax.random.key(0), mesh, variables)
    step = make_train_step(det, tx, schedule, mesh)
    losses = []
    for i in range(num_steps):
      state, metrics = step(state, data[i % num_batches])
      losses.append(float(metrics["loss"]))
    curves[dtype] = losses
  return curves


def worker_jax(sizes):
  import jax
  train = []
  for batch in sizes["batches"]:
    for dtype in ("float32", "bfloat16"):
      r = train_step.worker_jax(_train_args(batch, sizes, dtype=dtype))
      train.append(_train_row(f"ours {dtype}", batch, r))
  t0 = time.perf_counter()
  curves = loss_curves(sizes["curve_steps"], sizes["curve_batch"])
  _progress(f"ours loss curves: {time.perf_counter() - t0:.1f} s, last f32 {curves['float32'][-1]:.3f} "
            f"bf16 {curves['bfloat16'][-1]:.3f}")
  infer = inference.worker_jax(_inference_args(sizes))
  _progress(f"ours inference: {infer}")
  return {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()], "train": train,
          "inference": infer, "loss_curves": dict(curves, batch=sizes["curve_batch"], seconds=time.perf_counter() - t0)}


def _progress(line):
  print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def _train_row(label, batch, r):
  """A train_step worker's result `r` as a device_check row (with batch and images/s), logged as it comes."""
  row = dict(r, batch=batch, images_per_s=batch / r["step_s"])
  _progress(f"{label} batch {batch}: {row['images_per_s']:.1f} img/s, "
            + json.dumps({k: v for k, v in r.items() if k != "step_times_s"}))
  return row


def worker_torch(sizes):
  train = []
  for batch in sizes["batches"]:
    r = train_step.worker_torch(_train_args(batch, sizes, amp=True, channels_last=True))
    train.append(_train_row("torchvision amp", batch, r))
  infer = inference.worker_torch(_inference_args(sizes))
  _progress(f"torchvision inference: {infer}")
  return {"train": train, "inference": infer}


def versions():
  import importlib.metadata as md
  out = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
               "numpy", "torch", "torchvision"):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      pass
  return out


def summary(ours, tv):
  """The issue's targets, side by side: best train images/s of each (bf16 for ours), inference ratios."""
  best = lambda rows: max(rows, key=lambda r: r["images_per_s"])
  ours_bf16 = best([r for r in ours["train"] if r["dtype"] == "bfloat16"])
  ours_f32 = best([r for r in ours["train"] if r["dtype"] == "float32"])
  tv_best = best(tv["train"])
  oi, ti = ours["inference"], tv["inference"]
  f32, bf16 = ours["loss_curves"]["float32"], ours["loss_curves"]["bfloat16"]
  tail = max(1, len(f32) // 10)
  mean = lambda xs: sum(xs) / len(xs)
  return {
      "train_best": {"ours_bf16": [ours_bf16["batch"], ours_bf16["images_per_s"]],
                     "ours_f32": [ours_f32["batch"], ours_f32["images_per_s"]],
                     "torchvision_amp": [tv_best["batch"], tv_best["images_per_s"]]},
      "train_ratio_bf16_vs_torchvision_amp": ours_bf16["images_per_s"] / tv_best["images_per_s"],
      "inference_latency_ratio": oi["latency_s"] / ti["latency_s"],
      "inference_throughput_ratio": oi["throughput_ips"] / ti["throughput_ips"],
      "postprocess_share": oi["postprocess_share"],
      "loss_first_f32_bf16": [f32[0], bf16[0]],
      "loss_last_tenth_mean_f32_bf16": [mean(f32[-tail:]), mean(bf16[-tail:])],
  }


def _write_json(path, obj):
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(path + ".tmp", path)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("outdir")
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--batches", type=lambda v: tuple(int(b) for b in v.split(",")), default=None,
                 help="per-device train batches, e.g. 64 or 24,64 (the loss curves then use the first)")
  p.add_argument("--curve_steps", type=int, default=None)
  p.add_argument("--worker", choices=["jax", "torch"], default=None)
  args = p.parse_args()
  sizes = dict(SMOKE if args.smoke else FULL)
  if args.batches:
    sizes.update(batches=args.batches, curve_batch=args.batches[0])
  if args.curve_steps:
    sizes.update(curve_steps=args.curve_steps)
  if args.worker:
    common.emit(worker_jax(sizes) if args.worker == "jax" else worker_torch(sizes))
    return
  os.makedirs(args.outdir, exist_ok=True)
  forwarded = ([args.outdir] + ["--smoke"] * args.smoke + ["--batches", ",".join(map(str, sizes["batches"])),
                                                           "--curve_steps", str(sizes["curve_steps"])])
  t0 = time.perf_counter()
  _progress(f"sizes {sizes}")
  ours = common.run_worker(__spec__.name, forwarded + ["--worker", "jax"])
  _write_json(os.path.join(args.outdir, "ours.json"), ours)  # kept if the torchvision worker fails
  tv = common.run_worker(__spec__.name, forwarded + ["--worker", "torch"])
  nvidia_smi = os.path.join(args.outdir, "nvidia-smi.txt")
  result = {"bench": "device_check", "smoke": args.smoke, "sizes": sizes, "cpus": os.cpu_count(),
            "versions": versions(), "ours": ours, "torchvision": tv, "summary": summary(ours, tv),
            "nvidia_smi": open(nvidia_smi).read() if os.path.exists(nvidia_smi) else None,
            "seconds": time.perf_counter() - t0}
  path = os.path.join(args.outdir, "device_check.json")
  _write_json(path, result)
  print(json.dumps(result["summary"], indent=1))
  print(f"wrote {path} in {result['seconds']:.0f} s")


if __name__ == "__main__":
  main()
