"""Training input pipeline throughput (images/s) on the embedded synthetic dataset.

  python -m bench.input_pipeline [--data_dir DIR] [--batch 32] [--steps 40] [--augmentation ssdlite]

Prints a table and one JSON line. tf.data uses every core this process may run on; per-core = total / cores.
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ssdlite_jax.data import config as data_config, pipeline


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--data_dir", default="~/tensorflow_datasets")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--augmentation", default="ssdlite")
  args = parser.parse_args()
  cfg = data_config.default_data_config()
  cfg.update(data_dir=args.data_dir, augmentation=args.augmentation)
  start = time.perf_counter()
  source = pipeline.open_source(cfg)  # generates and prepares the dataset on first use
  prepare_s = time.perf_counter() - start
  it = pipeline.create_train_dataset(source, global_batch_size=args.batch, image_size=(320, 320), seed=0,
                                     process_index=0, process_count=1)
  for _ in range(args.warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(args.steps):
    next(it)
  seconds = time.perf_counter() - start
  cores = len(os.sched_getaffinity(0))
  total = args.steps * args.batch / seconds
  result = {"bench": "input_pipeline", "dataset": "synthetic", "augmentation": args.augmentation,
            "image_size": [320, 320], "batch": args.batch, "steps": args.steps, "cores": cores,
            "images_per_s": round(total, 1), "images_per_s_per_core": round(total / cores, 1),
            "prepare_s_first_use": round(prepare_s, 1)}
  print(f"{'augmentation':<14}{'batch':>6}{'cores':>6}{'img/s':>10}{'img/s/core':>12}")
  print(f"{args.augmentation:<14}{args.batch:>6}{cores:>6}{total:>10.1f}{total / cores:>12.1f}")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
