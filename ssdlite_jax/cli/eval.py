"""COCO evaluation of a checkpoint or of torchvision weights on a config's eval split.

  python eval.py --config configs/ssdlite320.py --workdir runs/coco [--step N|best]
  python eval.py --config configs/ssdlite320.py --weights runs/coco/checkpoints --out eval_out
  python eval.py --config configs/ssdlite320.py --weights ssdlite320_mobilenet_v3_large \
      --config.data.manual_dir=/data/coco_zips

The model comes from the checkpoint's own model config (--workdir: WORKDIR/checkpoints; --weights: a checkpoint
directory), or from config.model with a weights file or name (the class count is the file's). --checkpoint and
--torch-weights are the deprecated names of --weights. Data: config.data's eval
split at global batch config.eval_batch_size. Prints COCOeval's summary and the per-class AP table; writes
detections.json (COCO results), metrics.json, per_class.json and confusion_matrix.json to --out (default
WORKDIR/eval, else ./eval_out), and plots/{pr_curve,confusion_matrix}.png and plots/val_batch_{labels,pred}.jpg
under it.
"""

try:  # torch (read .pth weights) must be imported before TensorFlow (the config imports it): else a segfault
  import torch  # noqa: F401
except ImportError:
  pass

import os
import sys
from typing import Dict, Optional, Union

from absl import app, flags
from ml_collections import config_flags

from ssdlite_jax.cli import STEP_HELP, WEIGHTS_HELP, checkpoint_step, deprecated, run_absl_program

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir (checkpoints in WORKDIR/checkpoints)")
_WEIGHTS = flags.DEFINE_string("weights", None, WEIGHTS_HELP)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "deprecated: --weights")
_TORCH_WEIGHTS = flags.DEFINE_string("torch-weights", None, "deprecated: --weights")
_STEP = flags.DEFINE_string("step", None, STEP_HELP)
_OUT = flags.DEFINE_string("out", None, "output directory (default: WORKDIR/eval, else ./eval_out)")


def load_model(config, *, workdir: Optional[str] = None, weights: Optional[str] = None,
               checkpoint_dir: Optional[str] = None, torch_weights: Optional[str] = None,
               step: Union[int, str, None] = None):
  """(detector, variables, step or None) from exactly one of workdir / weights (a checkpoint directory, or a
  weights file or name) / checkpoint_dir / torch_weights; weights files are read as config.model describes them,
  with the class count of the file."""
  from ssdlite_jax import files
  from ssdlite_jax.loading import load_detector

  given = [n for n, v in (("workdir", workdir), ("weights", weights), ("checkpoint", checkpoint_dir),
                          ("torch-weights", torch_weights)) if v]
  if len(given) != 1:
    raise ValueError(f"give exactly one of --workdir, --weights (got {given or 'none'})")
  if weights:
    checkpoint_dir, torch_weights = (weights, None) if files.isdir(weights) else (None, weights)
  if torch_weights:
    if step is not None:
      raise ValueError(f"--step applies to checkpoints, not to the weights file {torch_weights}")
    return load_detector(torch_weights, config.model)
  return load_detector(checkpoint_dir or os.path.join(workdir, "checkpoints"), step=step)


def run(config, *, workdir: Optional[str] = None, weights: Optional[str] = None,
        checkpoint_dir: Optional[str] = None, torch_weights: Optional[str] = None,
        step: Union[int, str, None] = None, out_dir: Optional[str] = None) -> Dict[str, float]:
  """Evaluates and returns the 12 COCO metrics (see ssdlite_jax.evaluation); ValueError on bad arguments."""
  import jax
  from ssdlite_jax import evaluation
  from ssdlite_jax.detect import eval_batch_size, make_eval_fn
  from ssdlite_jax.data import pipeline

  # The model first: a wrong path fails at once, before a dataset is prepared.
  detector, variables, step = load_model(config, workdir=workdir, weights=weights, checkpoint_dir=checkpoint_dir,
                                         torch_weights=torch_weights, step=step)
  source = pipeline.open_source(config.data)
  info = source.info
  if info.num_classes != detector.config.num_classes:
    raise ValueError(
        f"the dataset has num_classes={info.num_classes} (config.data: name={config.data.name!r}, "
        f"label_mode={config.data.label_mode!r}) but the model has {detector.config.num_classes}; evaluate on "
        "the data the model was trained for")
  if out_dir is None:
    out_dir = os.path.join(workdir, "eval") if workdir else "eval_out"
  batch_size = eval_batch_size(detector, config.eval_batch_size)
  batches, num_batches = pipeline.create_eval_dataset(
      source, global_batch_size=batch_size, image_size=detector.input_size)
  described = f"checkpoint step {step}" if step is not None else weights or torch_weights
  print(f"evaluating {described} on {config.data.name} ({num_batches} batches of {batch_size})",
        flush=True)
  plots = evaluation.EvalPlots(os.path.join(out_dir, "plots"), info.class_names,
                               pipeline.eval_examples(source, 16) if jax.process_index() == 0 else ())
  metrics = evaluation.evaluate(make_eval_fn(detector), variables, batches, info.label_to_category_id,
                                info.gt_json, out_dir, plots, config.plot_score_thresh)
  if jax.process_index() == 0:
    print(f"wrote {out_dir}/{{detections,metrics,per_class,confusion_matrix}}.json and {out_dir}/plots/",
          flush=True)
  return metrics


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required")
  for flag in (_CHECKPOINT, _TORCH_WEIGHTS):
    if flag.value:
      deprecated(f"--{flag.name}", "--weights")
  try:
    step = None if _STEP.value is None else checkpoint_step(_STEP.value)
    run(_CONFIG.value, workdir=_WORKDIR.value, weights=_WEIGHTS.value, checkpoint_dir=_CHECKPOINT.value,
        torch_weights=_TORCH_WEIGHTS.value, step=step, out_dir=_OUT.value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


def cli():
  """The `ssdlite-eval` program."""
  run_absl_program(main, __name__)


if __name__ == "__main__":
  cli()
