"""results.csv: a run's metrics.jsonl as one table, a row per step, train and eval columns side by side."""

import csv
import json
import os


def read_metrics_jsonl(path: str):
  """(columns, rows) from metrics.jsonl ({"step", "train/..." or "eval/...": value} per line): one row per step
  that logged anything, train/* columns first, None where a step has no value; a resumed run's repeated steps
  keep their last values."""
  rows = {}
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      rows.setdefault(record.pop("step"), {}).update(record)
  columns = ["step"] + sorted({k for r in rows.values() for k in r}, key=lambda k: (not k.startswith("train/"), k))
  return columns, [{"step": step, **{c: r.get(c) for c in columns[1:]}} for step, r in sorted(rows.items())]


def write_csv(columns, rows, path: str) -> str:
  """Writes rows ({column: value or None}) as CSV (None as an empty cell), atomically."""
  with open(path + ".tmp", "w", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)
  os.replace(path + ".tmp", path)
  return path
