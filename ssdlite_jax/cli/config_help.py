"""--config-help: every field of a config with its value and, where the project's sources document it, what it
does: the comment on the line that sets it (configs/*.py, the model configs) or its entry in the docstring of
its section's defaults (e.g. data.config.default_data_config: "  name: what it is")."""

import inspect
import os
import re
from typing import Dict, Iterator, Tuple

_SET = re.compile(r"^\s*[A-Za-z_]\w*((?:\.\w+)+)\s*=.*?#\s*(.+?)\s*$")   # config.data.name = ...  # help
_ENTRY = re.compile(r"^  (\w+(?:, \w+)*)(?: \(\w+\))?: (.+)$")            # docstring: "  a, b: help"
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sources(config_file: str) -> Iterator[Tuple[str, str, str]]:
  """(field prefix, kind, text): `config_file` and the configs/ files it builds on (`from configs import ...`),
  nearest first (line comments), the model configs' modules (line comments under model.), the data defaults'
  docstring (entries under data.)."""
  from ssdlite_jax.data import config as data_config
  from ssdlite_jax.rcnn import configs as rcnn_configs
  from ssdlite_jax.ssd import configs as ssd_configs
  queue, seen = [config_file], set()
  while queue:
    path = queue.pop(0)
    if path in seen:
      continue
    seen.add(path)
    with open(path) as f:
      text = f.read()
    yield "", "comments", text
    for names in re.findall(r"^from configs import ([\w, ]+)$", text, re.M):
      queue += [os.path.join(_REPO, "configs", f"{name.strip()}.py") for name in names.split(",")]
  for module in (ssd_configs, rcnn_configs):
    yield "model.", "comments", inspect.getsource(module)
  yield "data.", "docstring", inspect.getdoc(data_config.default_data_config) or ""


def field_help(config_file: str) -> Dict[str, str]:
  """{dotted field: help} from the project's sources, `config_file` first (the first found wins)."""
  found = {}
  for prefix, kind, text in _sources(config_file):
    if kind == "comments":
      for match in map(_SET.match, text.splitlines()):
        if match:
          found.setdefault(prefix + match[1][1:], match[2])
      continue
    names, words = [], []
    for line in ["  " + line for line in text.splitlines()] + [""]:   # getdoc dedents: entries at 0, then 2
      entry = _ENTRY.match(line)
      if entry or not line.startswith("    "):   # not an entry's continuation line: the entry so far is complete
        for name in names:
          found.setdefault(prefix + name, " ".join(words))
        names, words = (entry[1].split(", "), [entry[2]]) if entry else ([], [])
      else:
        words.append(line.strip())
  return found


def _leaves(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield prefix + key, value


def describe(config, config_file: str) -> str:
  """One line per leaf field of `config` (loaded from `config_file`), `name = value`, its help indented below it
  where known."""
  known = field_help(config_file)
  lines = []
  for name, value in _leaves(config.to_dict()):
    lines.append(f"{name} = {value!r}")
    if name in known:
      lines.append(f"    {known[name]}")
  return "\n".join(lines)
