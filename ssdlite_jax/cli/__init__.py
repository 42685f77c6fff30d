"""The command-line programs: train, eval, predict, port_weights, export (top-level scripts and console scripts)."""

import sys


def run_absl_program(main, module_name: str) -> None:
  """absl's app.run(main), with the flags that `module_name` defines shown by --help whichever script (train.py,
  the `ssdlite-train` console script, python -m ...) started the program."""
  from absl import app, flags
  for flag in flags.FLAGS.get_key_flags_for_module(module_name):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(main)
