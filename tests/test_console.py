"""What the programs print: other libraries' INFO lines are filtered out; ours, and every warning, stay."""

import logging
import os

import orbax.checkpoint

import ssdlite_jax
from ssdlite_jax.cli import OurInfoOnly

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


def test_tfds_custom_configuration_note_is_dropped():
  """TFDS logs "Using custom data configuration" as a WARNING for every folder dataset: a note, not a problem."""
  keep = OurInfoOnly().filter
  note = logging.LogRecord("absl", logging.WARNING, "/x/tensorflow_datasets/core/dataset_builder.py", 1414,
                           "Using custom data configuration: %s", ("synthetic_shapes_0",), None)
  assert not keep(note)
  note.msg = "Could not find the dataset: %s"
  assert keep(note)
