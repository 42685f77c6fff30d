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
