"""The command-line programs: train, eval, predict, port_weights, export (top-level scripts and console scripts)."""

import logging
import os
import sys

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
# The programs import TensorFlow (input pipeline) after this package: its and XLA's C++ INFO lines stay off
# unless the user sets TF_CPP_MIN_LOG_LEVEL=0 themselves (all but TF 2.21's oneDNN notice on AVX-512 CPUs, which
# it logs before absl::InitializeLog, whatever the level).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


# Other libraries' warnings that are notes, not problems: shown only with --verbosity >= 1.
NOTES = ("Using custom data configuration",)   # TFDS, for every prepared folder dataset


class OurInfoOnly(logging.Filter):
  """Passes warnings and errors from anywhere (but the NOTES), INFO and below only from ssdlite_jax's own code:
  other libraries' INFO lines (orbax's checkpoint timings, TFDS's dataset notes, jax's backend probing) are
  dropped."""

  def filter(self, record: logging.LogRecord) -> bool:
    if os.path.abspath(record.pathname).startswith(_PACKAGE_DIR):
      return True
    return record.levelno >= logging.WARNING and not str(record.msg).startswith(NOTES)


def run_absl_program(main, module_name: str) -> None:
  """absl's app.run(main), with the flags that `module_name` defines shown by --help whichever script (train.py,
  the `ssdlite-train` console script, python -m ...) started the program, and, unless --verbosity >= 1, only our
  own INFO lines on the console (OurInfoOnly)."""
  from absl import app, flags
  from absl import logging as absl_logging
  for flag in flags.FLAGS.get_key_flags_for_module(module_name):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

  def quiet_main(argv):
    if flags.FLAGS.verbosity < 1:
      absl_logging.get_absl_handler().addFilter(OurInfoOnly())
    return main(argv)
  app.run(quiet_main)
