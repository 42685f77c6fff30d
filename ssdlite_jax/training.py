"""The training loop behind train.py (ssdlite_jax/cli/train.py): data, model, optimizer and checkpoints from a
config; steps, logging, evaluation, plots and checkpoints in a work directory.

    from ssdlite_jax import training
    training.train(config, "runs/synthetic")   # config: configs/*.py's get_config()

Rerunning with the same workdir resumes from its last checkpoint (same step, optimizer state, RNG and data
position). SIGTERM saves a checkpoint and returns, every process at the same step; a non-finite loss raises
NonFiniteLoss naming the step and keeps the last good checkpoint. Multi-host: one process per host
(jax.distributed is initialised from JAX_COORDINATOR_ADDRESS / SLURM / TPU environments), all with the same
workdir, local or in object storage (gs://BUCKET/run: files.py). Imports TensorFlow (input pipelines,
TensorBoard): a caller that reads .pth weights imports torch first (the reverse order segfaults).
"""

import dataclasses
import itertools
import json
import os
import time
from typing import Callable, Dict, Iterable, Iterator

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from ssdlite_jax import checkpoint, distributed, evaluation, files, plots, porting, results, train_step as ts
# before tensorflow: the data package says where TF comes from when it is missing
from ssdlite_jax.data import coco_folder, pipeline, sources
from ssdlite_jax.detect import eval_batch_size, make_eval_fn
from ssdlite_jax.loading import load_detector
from ssdlite_jax.detector import Detector
from ssdlite_jax.zoo import build_model
from ssdlite_jax.optim import base_learning_rate, make_optimizer, warmup_steps

import tensorflow as tf  # TensorBoard writers (after pipeline: see above)


class NonFiniteLoss(RuntimeError):
  pass


def initial_variables(config, detector, rng):
  """Variables to start from: None (fresh init), a torchvision state_dict or a checkpoint (config.init_from),
  then, with config.init_backbone_from, the backbone from an ImageNet classifier's weights (the rest as before).

  A different num_classes keeps a fresh classification head (reported)."""
  variables = None
  if config.init_from:
    source, variables, _ = load_detector(config.init_from)
    variables, problems = porting.transfer(variables, source, detector, rng)
    logging.info("initialised from %s; %d tensors not loaded%s", config.init_from, len(problems),
                 "".join(f"\n  {p}" for p in problems))
  if config.init_backbone_from:
    if variables is None:  # the fresh init create_train_state would draw
      variables = detector.init(jax.random.split(rng)[1])
    try:
      variables, count = porting.import_backbone(porting.load_state_dict(config.init_backbone_from), detector,
                                                 variables)
    except ValueError as e:
      raise ValueError(f"config.init_backbone_from={config.init_backbone_from}: {e}") from None
    logging.info("backbone: %d tensors from %s", count, config.init_backbone_from)
  return variables


class Logger:
  """metrics.jsonl, results.csv, TensorBoard event files and, with `plots`, plots/results.png in the workdir
  (process 0 only). In object storage, metrics.jsonl and the event files are written locally (files.Mirror) and
  uploaded by `sync()`: at each evaluation and checkpoint, and at the end."""

  def __init__(self, workdir, plots=True):
    self.enabled, self.workdir, self.plots = jax.process_index() == 0, workdir, plots
    if self.enabled:
      self.mirror = files.Mirror(workdir, fetch=("metrics.jsonl",))   # a resumed run appends to it
      self.jsonl = open(os.path.join(self.mirror.local, "metrics.jsonl"), "a")
      self.tb = tf.summary.create_file_writer(os.path.join(self.mirror.local, "tensorboard"))

  def write(self, step, scalars, prefix):
    if not self.enabled:
      return
    self.jsonl.write(json.dumps({"step": step, **{f"{prefix}/{k}": v for k, v in scalars.items()}}) + "\n")
    self.jsonl.flush()
    with self.tb.as_default():
      for k, v in scalars.items():
        tf.summary.scalar(f"{prefix}/{k}", v, step=step)
    self.tb.flush()

  def write_results(self):
    """WORKDIR/results.csv and plots/results.png (train losses, LR, AP and AP50 against steps)."""
    if not self.enabled:
      return
    self.jsonl.flush()
    columns, rows = results.read_metrics_jsonl(self.jsonl.name)
    results.write_csv(columns, rows, os.path.join(self.workdir, "results.csv"))
    if not self.plots:
      return
    shown = [c for c in columns if c.startswith("train/") or c in ("eval/AP", "eval/AP50")]
    plots.plot_results([{"step": r["step"], **{c: r[c] for c in shown}} for r in rows],
                       os.path.join(self.workdir, "plots", "results.png"))
    self.sync()

  def sync(self):
    if self.enabled:
      self.jsonl.flush()
      self.tb.flush()
      self.mirror.sync()

  def close(self):
    if self.enabled:
      self.jsonl.close()
      self.tb.close()
      self.mirror.close()


def run_eval(run, variables, step):
  """COCO evaluation of `variables` on the val split: detections and metrics under WORKDIR/eval/step_N, the
  pictures under WORKDIR/plots with config.plots (results.csv and plots/results.png brought up to date)."""
  pictures = (evaluation.EvalPlots(os.path.join(run.workdir, "plots"), run.source.info.class_names,
                                   run.val_examples) if run.config.plots else None)
  metrics = evaluation.evaluate(run.detect_fn, variables, run.eval_batches, run.source.info.label_to_category_id,
                                run.source.info.gt_json, os.path.join(run.workdir, "eval", f"step_{step}"),
                                pictures, run.config.plot_score_thresh)
  run.logger.write(step, metrics, "eval")
  run.logger.write_results()
  return metrics


class MetricsMean:
  """Means of the train-step metrics over the steps since the last `pop` (summed on device: no host sync per
  step); lr is the last step's."""

  def __init__(self):
    self.total, self.count, self.last = None, 0, None

  def add(self, metrics):
    metrics = {k: v for k, v in metrics.items() if k != "finite"}
    self.total = metrics if self.total is None else jax.tree.map(jnp.add, self.total, metrics)
    self.count, self.last = self.count + 1, metrics

  def pop(self) -> Dict[str, float]:
    out = {k: float(v) / self.count for k, v in jax.device_get(self.total).items()}
    out["lr"] = float(self.last["lr"])
    self.total, self.count, self.last = None, 0, None
    return out


@dataclasses.dataclass
class Run:
  """What the training loop works with, built by `train`."""
  config: ml_collections.ConfigDict
  workdir: str
  detector: Detector
  source: sources.Source
  step_fn: Callable
  data: Iterator                   # sharded global batches, prefetched to the devices
  detect_fn: Callable              # jitted detect.detect, for evaluation
  eval_batches: Iterable           # re-iterable eval batches of this process
  val_examples: list               # the first val images and their boxes, drawn in the mosaics (process 0)
  mngr: ocp.CheckpointManager
  logger: Logger
  preemption: distributed.Preemption
  steps_per_epoch: int
  total_steps: int


def train(config, workdir):
  """Trains (or resumes) `config` (configs/*.py's) in `workdir`; returns the final COCO metrics (None after a
  SIGTERM, which saves and returns)."""
  tf.config.set_visible_devices([], "GPU")   # TensorFlow only reads data: the accelerators are JAX's
  # From the start: a SIGTERM during the set-up (data preparation, compiles) stops after the first step as well.
  preemption = distributed.Preemption()
  distributed.maybe_initialize_distributed()   # before anything touches JAX's backend (build_model does)
  preemption.start()
  files.makedirs(workdir)
  source = pipeline.open_source(config.data)
  info = source.info
  if info.num_classes != config.model.num_classes:
    raise ValueError(f"config.model.num_classes={config.model.num_classes} but the dataset "
                     f"{config.data.name!r} has {info.num_classes} (incl. background); "
                     f"set --config.model.num_classes={info.num_classes}")
  config.model.class_names = tuple(info.class_names)
  if jax.process_index() == 0:
    files.write_text_atomically(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))

  detector = build_model(config.model, bn_axis_name=distributed.AXIS if config.sync_bn else None)
  mesh = distributed.make_mesh()
  if config.batch_size % mesh.size:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the {mesh.size} devices")
  groups = None
  if detector.input_size is None:   # the family resizes each image: aspect-ratio groups, one canvas each
    groups = pipeline.aspect_ratio_groups(source, detector.resized_size, detector.size_divisible,
                                          config.data.aspect_ratio_group_factor)
    steps_per_epoch = max(1, groups.batches_per_epoch(config.batch_size))
  else:
    steps_per_epoch = max(1, pipeline.num_train_examples(source) // config.batch_size)
  total_steps = steps_per_epoch * config.num_epochs
  if config.max_steps:
    total_steps = min(total_steps, config.max_steps)
  config.optim.frozen = tuple(dict.fromkeys(
      tuple(config.optim.frozen) + detector.frozen_modules(backbone_pretrained=bool(config.init_backbone_from))))
  tx, schedule = make_optimizer(config.optim, steps_per_epoch)
  rng = jax.random.key(config.seed)
  state = ts.create_train_state(detector, tx, rng, mesh, initial_variables(config, detector, rng))
  step_fn = ts.make_train_step(detector, tx, schedule, mesh)

  mngr = checkpoint.train_manager(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
  if mngr.latest_step() is not None:
    state = checkpoint.restore_train_state(mngr, state, mngr.latest_step())
  start = int(state.step)
  data = pipeline.create_train_dataset(source, global_batch_size=config.batch_size,
                                       image_size=detector.input_size, seed=config.seed, start_step=start,
                                       groups=groups)
  data = distributed.prefetch_to_mesh(data, mesh)
  if start < total_steps:
    # Compile before the first collective, then meet there together: a process that joins gloo's
    # rendezvous more than 30 s after another (still compiling) fails the whole run.
    first = next(data)
    step_fn = compile_train_step(step_fn, state, first, groups, config.batch_size)
    data = itertools.chain([first], data)
    distributed.wait_for_all_processes("train_step_compiled")
  eval_batches, _ = pipeline.create_eval_dataset(
      source, global_batch_size=eval_batch_size(detector, config.eval_batch_size), image_size=detector.input_size)
  logger = Logger(workdir, config.plots)
  val_examples, ground_truth = [], {}
  if jax.process_index() == 0:
    val_examples = pipeline.eval_examples(source, 16)
    ground_truth = {split: read_json(path) for split, path in (("train", info.train_json), ("val", info.gt_json))
                    if path}
    if config.plots:
      draw_labels(source, ground_truth.get("train"), os.path.join(workdir, "plots", "labels.png"))
  run = Run(config, workdir, detector, source, step_fn, data, make_eval_fn(detector), eval_batches,
            val_examples, mngr, logger, preemption, steps_per_epoch, total_steps)
  for line in run_summary(config, workdir, source, ground_truth, detector, state, mesh, steps_per_epoch,
                          total_steps, start, groups):
    logging.info("%s", line)
  try:
    return _loop(run, state)
  finally:
    mngr.wait_until_finished()
    mngr.close()
    logger.close()


def compile_train_step(step_fn, state, first, groups, global_batch_size):
  """The jitted step compiled for the first batch's shape or, with aspect-ratio groups, for each group's canvas (one
  program each, logged), dispatched on the batch's canvas."""
  if groups is None:
    return step_fn.lower(state, first).compile()
  spec = lambda x, shape: jax.ShapeDtypeStruct(shape, x.dtype, sharding=x.sharding)
  programs = {}
  for g, canvas in sorted(groups.canvases.items()):
    if np.sum(groups.group == g) < global_batch_size:   # no full batch: never trained on
      continue
    start = time.time()
    batch = jax.tree.map(lambda x: spec(x, x.shape), first)
    image = first["image"]
    batch["image"] = spec(image, image.shape[:1] + tuple(canvas) + image.shape[3:])
    programs[tuple(canvas)] = step_fn.lower(state, batch).compile()
    logging.info("train step compiled for the %dx%d canvas (aspect-ratio group %d) in %.0f s", *canvas, g,
                 time.time() - start)
  return lambda state, batch: programs[tuple(batch["image"].shape[1:3])](state, batch)


def read_json(path):
  return json.loads(files.read_text(path))


def draw_labels(source, train_gt, path):
  """plots/labels.png: the classes, box sizes and centres of train_gt (the train split's COCO dict, or None)."""
  if files.exists(path):
    return
  if train_gt is None:
    logging.info("no plots/labels.png: %r has no train json to read the labels from", source.config.name)
    return
  plots.plot_labels(train_gt, path)


def run_summary(config, workdir, source, ground_truth, detector, state, mesh, steps_per_epoch, total_steps, start,
                groups=None):
  """The start-up lines: where it runs, on what data (with ground_truth {split: COCO dict}: images, background
  images and boxes per class; with aspect-ratio groups their canvases), which model, how long, from where."""
  size = detector.input_size or max(groups.canvases.values(), key=lambda hw: hw[0] * hw[1])
  variables = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.variables)
  splits = source.builder.info.splits
  optim = config.optim
  lines = [
      f"devices: {mesh.size} x {mesh.devices.flat[0].platform} in {jax.process_count()} process(es), mesh "
      f"{dict(mesh.shape)}, model.kernels {detector.kernels!r}",
      f"data: {config.data.name!r}, {config.model.num_classes - 1} classes; "
      + ", ".join(f"{name} {splits[name].num_examples} images"
                  for name in (source.info.train_split, source.info.eval_split)),
      *(coco_folder.split_summary(f"  {split}", gt["images"], gt["annotations"], gt["categories"])
        for split, gt in ground_truth.items()),
      *([f"  aspect-ratio groups (factor {config.data.aspect_ratio_group_factor}), a compiled step each: "
         + groups.describe(config.batch_size)] if groups else []),
      f"model: {detector.describe()}, "
      f"{sum(x.size for x in jax.tree.leaves(variables['params'])):,} parameters, "
      + (f"{forward_gflops(detector, variables, size):.2f} GFLOP per {size[0]}x{size[1]} image (forward, XLA's "
         "count), "
         if config.count_flops else "")
      + f"dtype {config.model.dtype}",
      f"schedule: global batch {config.batch_size}, {steps_per_epoch} steps per epoch, {total_steps} steps; "
      f"{optim.optimizer} lr {base_learning_rate(optim):g} "
      f"({optim.learning_rate:g} x {optim.batch_size}/{optim.base_batch_size}), weight decay "
      f"{optim.weight_decay:g}, warmup {warmup_steps(optim, steps_per_epoch)} steps, "
      + (f"x{optim.gamma:g} at epochs {tuple(optim.milestones)}" if optim.schedule == "multistep"
         else f"cosine over {optim.num_epochs} epochs")
      + (f"; frozen: {', '.join(optim.frozen)}" if optim.frozen else ""),
      f"workdir: {workdir}" + (f"; resumed from its checkpoint of step {start}" if start else ""),
  ]
  return lines


def forward_gflops(detector, variables, size) -> float:
  """XLA's FLOP count of the network's forward pass on one (h, w) `size` image, in GFLOP (nan where the backend
  gives none)."""
  image = jax.ShapeDtypeStruct((1,) + tuple(size) + (3,), jnp.float32)
  cost = jax.jit(lambda v, x: detector.module.apply(v, x)).lower(variables, image).cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return cost.get("flops", float("nan")) / 1e9


def epoch_bar(run, step, postfix):
  """The progress bar of the epoch that (0-based) `step` is in, from that step on (process 0 only)."""
  epoch, first = divmod(step, run.steps_per_epoch)
  epochs = -(-run.total_steps // run.steps_per_epoch)
  total = min(run.steps_per_epoch, run.total_steps - epoch * run.steps_per_epoch)
  bar = tqdm.tqdm(total=total, initial=first, desc=f"epoch {epoch + 1}/{epochs}", dynamic_ncols=True,
                  disable=jax.process_index() != 0)
  bar.set_postfix(postfix)
  return bar


def _loop(run, state):
  """The training loop proper: steps, logging, periodic eval and checkpoints, final eval."""
  config, done = run.config, int(state.step)
  eval_every = config.eval_every_epochs * run.steps_per_epoch
  bar, postfix = None, {}
  t0, last_logged, previous, interval = time.time(), done, None, MetricsMean()
  for step in range(done, run.total_steps):
    if bar is None:
      bar = epoch_bar(run, step, postfix)
    state, metrics = run.step_fn(state, next(run.data))
    interval.add(metrics)
    done = step + 1
    bar.update(1)
    last = done == run.total_steps
    log_now = done % config.log_every_steps == 0 or last
    eval_now = bool(eval_every) and done % eval_every == 0 and not last
    save_now = not last and (done % config.checkpoint_every_steps == 0 or eval_now)
    stopping = run.preemption.reached(done)
    # The previous step is checked while this one runs (no per-step host stall); this one only before the
    # host reads or saves the state.
    if previous is not None:
      check_finite(*previous)
    if log_now or eval_now or save_now or stopping:
      check_finite(done, metrics)
    previous = (done, metrics)
    if log_now:
      scalars = interval.pop()
      scalars["images_per_sec"] = (done - last_logged) * config.batch_size / (time.time() - t0)
      t0, last_logged = time.time(), done
      run.logger.write(done, scalars, "train")
      postfix = {"loss": f"{scalars['loss']:.3f}",
                 **{short: f"{scalars[term]:.3f}" for term, short in run.detector.LOSS_TERMS.items()},
                 "lr": f"{scalars['lr']:.2e}", "img/s": f"{scalars['images_per_sec']:.1f}"}
      bar.set_postfix(postfix)
    if done % run.steps_per_epoch == 0 or last:   # the epoch's line stays, above what evaluation prints
      bar.close()
      bar = None
    eval_metrics = run_eval(run, state.variables, done) if eval_now else None
    if save_now:
      checkpoint.save_train_state(run.mngr, state, config.model, eval_metrics)
      run.logger.sync()
    if stopping:
      if bar is not None:
        bar.close()
      if jax.process_count() > 1:
        logging.warning("SIGTERM on a process: all %d processes save step %d and exit", jax.process_count(), done)
      else:
        logging.warning("received signal %d: saving step %d and exiting", run.preemption.signal, done)
      checkpoint.save_train_state(run.mngr, state, config.model)
      return None
  final = run_eval(run, state.variables, int(state.step))
  checkpoint.save_train_state(run.mngr, state, config.model, final)
  if jax.process_index() == 0:
    print(f"\nmAP@[.5:.95] = {final['AP']:.3f} at step {int(state.step)}; results.csv and plots/ in {run.workdir}")
  return final


def check_finite(step, metrics):
  """Raises NonFiniteLoss if update number `step` (1-based) had a non-finite loss or gradient."""
  if not bool(metrics["finite"]):
    raise NonFiniteLoss(f"non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}); "
                        f"the update was skipped and the last good checkpoint is kept")
