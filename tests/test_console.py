"""What the programs print: other libraries' INFO lines are filtered out; ours, and every warning, stay; a config
error is one line naming the flag."""

import logging
import os
import subprocess
import sys

import orbax.checkpoint
import pytest

import ssdlite_jax
from ssdlite_jax.cli import OurInfoOnly
from tests.helpers import REPO, subprocess_env

PACKAGE = os.path.dirname(ssdlite_jax.__file__)


def _record(pathname, level):
  return logging.LogRecord("any", level, pathname, 1, "message", None, None)


def test_only_our_info_lines_pass():
  keep = OurInfoOnly().filter
  assert keep(_record(os.path.join(PACKAGE, "cli", "train.py"), logging.INFO))
  assert not keep(_record(orbax.checkpoint.__file__, logging.INFO))
  assert not keep(_record(orbax.checkpoint.__file__, logging.DEBUG))
  assert keep(_record(orbax.checkpoint.__file__, logging.WARNING)) and keep(_record("x.py", logging.ERROR))
  assert not keep(_record(PACKAGE + "_plugins/train.py", logging.INFO))   # a sibling directory is not ours


def test_notes_logged_as_warnings_are_dropped():
  """TFDS logs "Using custom data configuration" as a WARNING for every folder dataset, orbax "Requested
  `tracked_metric`; did not provide metrics" for every checkpoint train.py saves without evaluating: notes, not
  problems."""
  keep = OurInfoOnly().filter
  note = logging.LogRecord("absl", logging.WARNING, "/x/tensorflow_datasets/core/dataset_builder.py", 1414,
                           "Using custom data configuration: %s", ("synthetic_shapes_0",), None)
  assert not keep(note)
  note.msg = "Could not find the dataset: %s"
  assert keep(note)
  orbax_note = logging.LogRecord("absl", logging.WARNING, orbax.checkpoint.__file__, 1489,
                                 "Requested `tracked_metric`; did not provide metrics.", None, None)
  assert not keep(orbax_note)


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/synthetic.py", "--config.batchsize=8"],
     "error: --config.batchsize: the config has no field 'batchsize' (did you mean 'batch_size'?)"),
    (["--config", "configs/synthetic.py", "--config.model.num_clases=3"],
     "error: --config.model.num_clases: the config has no field 'num_clases' (did you mean 'num_classes'?)"),
    (["--config", "configs/missing.py"], "error: --config: [Errno 2] No such file or directory: 'configs/missing.py'"),
])
def test_a_config_error_is_one_line_naming_the_flag(args, message, tmp_path):
  """A misspelt --config.FIELD or a missing config file: one line naming the flag (ml_collections' own hint
  included), exit code 2, no traceback and no other line, nothing written."""
  result = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args, "--workdir", str(tmp_path / "run")],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr
  assert result.stderr.splitlines() == [message]
  assert not os.path.exists(tmp_path / "run")


def _leaves(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key} = {value!r}"


def test_config_help_lists_every_field_with_its_value_and_help():
  """train.py --config FILE --config-help (no --workdir): every leaf field of the config with its value, overrides
  applied, and under a field what the config file's line comment (else that of the config it builds on) or the
  data defaults' docstring says."""
  from configs import synthetic
  config = synthetic.get_config()
  config.batch_size = 3
  result = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--config", "configs/synthetic.py",
                           "--config.batch_size=3", "--config-help"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert [line for line in lines if not line.startswith("    ")] == list(_leaves(config.to_dict()))
  help_of = {lines[i]: lines[i + 1].strip() for i in range(len(lines) - 1) if lines[i + 1].startswith("    ")}
  assert help_of["model.num_classes = 4"] == "background + ellipse, rectangle, triangle (checked against the data)"
  assert help_of["eval_every_epochs = 0"] == "evaluate once, at the end"   # the file's own, not ssdlite320.py's
  assert help_of["data.augmentation = 'ssdlite'"].startswith("'ssdlite' | 'ssd' | 'hflip' | 'none' (training;")
  assert help_of["data.name = 'synthetic'"].endswith("then prepared as coco_folder).")   # continuation joined
  assert help_of["batch_size = 3"].startswith("global; 24 per device on 8 devices")
