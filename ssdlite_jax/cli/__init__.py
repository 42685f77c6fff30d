"""The command-line programs: train, eval, predict, port_weights, export (top-level scripts and console scripts)."""

import logging
import os
import re
import sys

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
# The programs import TensorFlow (input pipeline) after this package: its and XLA's C++ INFO lines stay off
# unless the user sets TF_CPP_MIN_LOG_LEVEL=0 themselves (all but TF 2.21's oneDNN notice on AVX-512 CPUs, which
# it logs before absl::InitializeLog, whatever the level).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


# Other libraries' warnings that are notes, not problems: shown only with --verbosity >= 1.
NOTES = ("Using custom data configuration",   # TFDS, for every prepared folder dataset
         "Requested `tracked_metric`; did not provide metrics")   # orbax, for each checkpoint saved unevaluated


class OurInfoOnly(logging.Filter):
  """Passes warnings and errors from anywhere (but the NOTES), INFO and below only from ssdlite_jax's own code:
  other libraries' INFO lines (orbax's checkpoint timings, TFDS's dataset notes, jax's backend probing) are
  dropped."""

  def filter(self, record: logging.LogRecord) -> bool:
    if os.path.abspath(record.pathname).startswith(_PACKAGE_DIR):
      return True
    return record.levelno >= logging.WARNING and not str(record.msg).startswith(NOTES)


def flag_error(error: Exception, argv) -> str:
  """A one-line message for an error that parsing `argv` raised from a config file or a --config.FIELD override
  (ml_collections raises it from deep inside its flag code), naming the flag."""
  text = str(error).replace("\\n", "\n")
  typo = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  if typo:
    flag = next((a.split("=")[0] for a in argv if re.match(rf"--\w+\.(\w+\.)*{re.escape(typo[2])}(=|$)", a)),
                f"--config.{typo[2]}")
    return f"{flag}: the config has no field {typo[2]!r} (did you mean {typo[1]!r}?)"
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


_CONFIG_ERRORS = (AttributeError, KeyError, OSError, TypeError, ValueError)


def _parse_flags(argv):
  """absl's flag parsing, with the errors of config files and their overrides as one line (exit code 2) instead of
  a traceback; absl's own flag errors keep its message."""
  from absl import flags

  def fail(message):
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)
  try:
    remaining = flags.FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)
  except _CONFIG_ERRORS as e:
    fail(flag_error(e, argv))
  for name in flags.FLAGS:
    try:   # a config file that failed to load raises on first use: here, not inside main
      getattr(flags.FLAGS[name].value, "to_dict", None)
    except _CONFIG_ERRORS as e:
      fail(f"--{name}: {flag_error(e, argv)}")
  return remaining


def run_absl_program(main, module_name: str) -> None:
  """absl's app.run(main), with the flags that `module_name` defines shown by --help whichever script (train.py,
  the `ssdlite-train` console script, python -m ...) started the program, config errors as one line
  (_parse_flags), and, unless --verbosity >= 1, only our own INFO lines on the console (OurInfoOnly)."""
  from absl import app, flags
  from absl import logging as absl_logging
  for flag in flags.FLAGS.get_key_flags_for_module(module_name):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

  def quiet_main(argv):
    if flags.FLAGS.verbosity < 1:
      absl_logging.get_absl_handler().addFilter(OurInfoOnly())
    return main(argv)
  app.run(quiet_main, flags_parser=_parse_flags)


WEIGHTS_HELP = ("a checkpoint directory (train.py's WORKDIR/checkpoints, port_weights.py's), a torchvision "
                ".pth or .safetensors file, or a weights name (ssdlite_jax/weights.py), local or gs://")
STEP_HELP = "checkpoint step: a number, or best (the highest AP train.py evaluated); default: the latest"


def deprecated(flag: str, use: str) -> None:
  """The one line a deprecated flag prints: what to `use` instead."""
  print(f"warning: {flag} is deprecated and will be removed: use {use}", file=sys.stderr)


def checkpoint_step(text: str):
  """--step's value: an int, or "best"."""
  if text == "best":
    return text
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"--step={text}: a step number or best") from None


def add_weights_arguments(parser) -> None:
  """--weights and --step on an argparse parser, and the flags --weights replaces (hidden, deprecated)."""
  import argparse
  parser.add_argument("--weights", help=WEIGHTS_HELP)
  parser.add_argument("--step", type=checkpoint_step, default=None, help=STEP_HELP)
  parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
  parser.add_argument("--torch-weights", help=argparse.SUPPRESS)


def weights_argument(args, parser) -> str:
  """The weights the arguments name: --weights, or one of the deprecated --checkpoint / --torch-weights (with a
  deprecation line); exactly one, else the parser's usage error."""
  given = [(flag, value) for flag, value in (("--weights", args.weights), ("--checkpoint", args.checkpoint),
                                             ("--torch-weights", args.torch_weights)) if value]
  if len(given) != 1:
    parser.error(f"give --weights once: {WEIGHTS_HELP}")
  flag, value = given[0]
  if flag != "--weights":
    deprecated(flag, "--weights")
  return value
