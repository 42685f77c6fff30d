"""Train an SSD detector.

  python train.py --config configs/synthetic.py --workdir runs/synthetic
  python train.py --config configs/ssdlite320.py --workdir runs/coco --config.batch_size=48

Rerunning the same command resumes from the last checkpoint in WORKDIR/checkpoints (same step, optimizer
state, RNG and data position). SIGTERM saves a checkpoint and exits cleanly; a non-finite loss stops
with an error naming the step and keeps the last good checkpoint. Multi-host: launch one process per
host (jax.distributed is initialised from JAX_COORDINATOR_ADDRESS / SLURM / TPU environments).
The loop itself: ssdlite_jax/training.py.
"""

import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from ssdlite_jax import checkpoint  # noqa: F401  (orbax: defines the flag set below)
from ssdlite_jax.cli import run_absl_program
from ssdlite_jax.porting import reads_torch

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Python config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics (local or gs://); required.")
flags.DEFINE_bool("config-help", False, "Print every field of --config (set with --config.FIELD=value) with its "
                  "value and what it does, then exit.")
flags.mark_flags_as_required(["config"])
# orbax's checkpoint barriers through the jax.distributed coordination service, with its long timeouts, instead
# of device collectives: between CPU processes (gloo) those fail when a peer arrives more than 30 s late.
if "experimental_orbax_use_distributed_barrier" in FLAGS:
  FLAGS.set_default("experimental_orbax_use_distributed_barrier", True)


def main(argv):
  del argv
  config = FLAGS.config
  if FLAGS["config-help"].value:
    from ssdlite_jax.cli import config_help
    print(config_help.describe(config, config_flags.get_config_filename(FLAGS["config"])))
    return
  if FLAGS.workdir is None:
    raise app.UsageError("--workdir is required: where checkpoints, logs and metrics go")
  if reads_torch(config.init_from) or reads_torch(config.init_backbone_from):
    import torch  # noqa: F401  (before TensorFlow, which training imports: the reverse order segfaults)
  from ssdlite_jax import training
  if not jax.config.jax_compilation_cache_dir:  # restarts and resumes skip the compiles
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/ssdlite_jax/xla"))
  try:
    training.train(config, FLAGS.workdir)
  except (training.NonFiniteLoss, ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


def cli():
  """The `ssdlite-train` program."""
  run_absl_program(main, __name__)


if __name__ == "__main__":
  cli()
