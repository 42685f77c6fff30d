"""Writing a file so that no reader (or a concurrent writer of the same file) sees half of it: the content
goes to a uniquely named temporary file beside it, which is then renamed over it."""

import os
import tempfile
from typing import Callable


def write_atomically(path: str, write: Callable[[str], None]) -> str:
  """Calls write(tmp) for a fresh temporary path in path's folder (same extension, for writers that go by it),
  then renames it to `path`; on failure the temporary file is removed and `path` is left as it was."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".",
                             suffix=".tmp" + os.path.splitext(path)[1])
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def write_text_atomically(path: str, text: str) -> str:
  def write(tmp):
    with open(tmp, "w", newline="") as f:
      f.write(text)
  return write_atomically(path, write)
