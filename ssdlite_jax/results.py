"""results.csv: a run's metrics.jsonl as one table, a row per step, train and eval columns side by side."""

import csv
import io
import json
import logging

from ssdlite_jax import files


def read_metrics_jsonl(path: str):
  """(columns, rows) from metrics.jsonl ({"step", "train/..." or "eval/...": value} per line): one row per step
  that logged anything, train/* columns first, None where a step has no value; a resumed run's repeated steps
  keep their last values."""
  rows = {}
  with files.open_file(path) as f:
    for number, line in enumerate(f, 1):
      try:
        record = json.loads(line)
      except json.JSONDecodeError:   # a line cut short by a killed run (the rerun appends after it)
        logging.warning("%s:%d: not a json record, skipped", path, number)
        continue
      rows.setdefault(record.pop("step"), {}).update(record)
  columns = ["step"] + sorted({k for r in rows.values() for k in r}, key=lambda k: (not k.startswith("train/"), k))
  return columns, [{"step": step, **{c: r.get(c) for c in columns[1:]}} for step, r in sorted(rows.items())]


def write_csv(columns, rows, path: str) -> str:
  """Writes rows ({column: value or None}) as CSV (None as an empty cell), atomically."""
  text = io.StringIO()
  writer = csv.DictWriter(text, columns)
  writer.writeheader()
  writer.writerows(rows)
  return files.write_text_atomically(path, text.getvalue())
