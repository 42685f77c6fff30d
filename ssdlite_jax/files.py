"""Every file the programs read or write, on local disk or in object storage (`gs://BUCKET/...`), and writes that
no reader (or a concurrent writer of the same file) sees half of.

Local paths are plain files, as `open` and `os` see them. Remote paths (a URI scheme) go through etils.epath's
fsspec backend (gcsfs for gs://): the client the tests run against a GCS emulator, selected with
EPATH_USE_TF=false unless the environment says otherwise (TensorFlow's gfile, epath's default where TF is
installed, ignores an emulator). orbax's arrays take tensorstore's own GCS driver to the same bucket.

A write to a remote path is made in a local temporary file and uploaded whole: an object store replaces an
object at once, so readers see the old object or the new one.
"""

import contextlib
import os
import shutil
import tempfile
from typing import Callable, Iterator, Sequence, Union

os.environ.setdefault("EPATH_USE_TF", "false")   # before epath picks a backend (it caches the choice)
from etils import epath  # noqa: E402
import fsspec.config  # noqa: E402

# gcsfs caches directory listings for the life of the process, so files that other processes write (a pod's other
# hosts, orbax's commit markers) would stay unseen: listings are always fetched.
for _protocol in ("gs", "gcs"):
  fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)

PathLike = Union[str, os.PathLike]


def is_remote(path: PathLike) -> bool:
  """Whether `path` is in object storage (has a URI scheme such as gs://)."""
  return "://" in os.fspath(path)


def absolute(path: PathLike) -> epath.Path:
  """`path` as an epath.Path; a local one made absolute (from the current directory)."""
  return epath.Path(path if is_remote(path) else os.path.abspath(path))


def exists(path: PathLike) -> bool:
  return epath.Path(path).exists()


def isdir(path: PathLike) -> bool:
  return epath.Path(path).is_dir()


def isfile(path: PathLike) -> bool:
  return epath.Path(path).is_file()


def size_and_mtime(path: PathLike) -> tuple:
  """(bytes, modification time in ns) of file `path`: what changes when it is rewritten."""
  if not is_remote(path):
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns
  stat = epath.Path(path).stat()
  return stat.length, int(stat.mtime * 1e9)


def walk_files(path: PathLike) -> Iterator[str]:
  """Every file under folder `path`, at any depth, as `path` joined with its relative path."""
  top = None
  for folder, _, names in epath.Path(path).walk():
    top = top or os.fspath(folder)   # `path` as the backend spells it (fsspec's drops the gs://)
    sub = os.path.relpath(os.fspath(folder), top)
    base = os.fspath(path).rstrip("/") + ("" if sub == "." else "/" + sub)
    for name in names:
      yield f"{base}/{name}"


def makedirs(path: PathLike) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def remove(path: PathLike) -> None:
  """Deletes file `path` if it exists."""
  epath.Path(path).unlink(missing_ok=True)


def open_file(path: PathLike, mode: str = "r"):
  """A file object for `path` (builtin `open` locally, epath remotely)."""
  return open(path, mode) if not is_remote(path) else epath.Path(path).open(mode)


def read_text(path: PathLike) -> str:
  with open_file(path) as f:
    return f.read()


@contextlib.contextmanager
def local_file(path: PathLike) -> Iterator[str]:
  """A local path with `path`'s content, for readers that need a file name: `path` itself if local, else a
  downloaded temporary copy (same base name), removed afterwards."""
  if not is_remote(path):
    yield os.fspath(path)
    return
  with tempfile.TemporaryDirectory(prefix="ssdlite_jax_") as folder:
    yield download(path, os.path.join(folder, epath.Path(path).name))


def download(path: PathLike, local: str) -> str:
  """Copies remote file `path` to local file `local`; returns `local`."""
  with epath.Path(path).open("rb") as src, open(local, "wb") as dst:
    shutil.copyfileobj(src, dst)
  return local


def upload(local: str, path: PathLike) -> None:
  """Copies local file `local` to remote `path` (one object, replaced whole)."""
  dst = epath.Path(path)
  dst.parent.mkdir(parents=True, exist_ok=True)
  with open(local, "rb") as src, dst.open("wb") as out:
    shutil.copyfileobj(src, out)


@contextlib.contextmanager
def writing(path: PathLike) -> Iterator[str]:
  """A fresh temporary local path (same extension, for writers that go by it) to write; when the block ends
  without an exception it is put at `path`: renamed over it on local disk, uploaded whole to object storage. On
  an exception `path` is left as it was and the temporary file is removed."""
  path = os.fspath(path)
  if is_remote(path):
    with tempfile.TemporaryDirectory(prefix="ssdlite_jax_") as folder:
      tmp = os.path.join(folder, os.path.basename(path))
      yield tmp
      upload(tmp, path)
    return
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".",
                             suffix=".tmp" + os.path.splitext(path)[1])
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_atomically(path: PathLike, write: Callable[[str], None]) -> str:
  """Calls write(tmp) for a temporary local path that is then put at `path` (`writing`); returns `path`."""
  with writing(path) as tmp:
    write(tmp)
  return os.fspath(path)


def write_text_atomically(path: PathLike, text: str) -> str:
  def write(tmp):
    with open(tmp, "w", newline="") as f:
      f.write(text)
  return write_atomically(path, write)


def upload_tree(local_dir: str, path: PathLike) -> int:
  """Copies the files under `local_dir` to remote folder `path` (replacing what was there); returns the bytes."""
  dst = epath.Path(path)
  if dst.exists():
    dst.rmtree()
  size = 0
  for folder, _, names in os.walk(local_dir):
    for name in names:
      local = os.path.join(folder, name)
      upload(local, dst / os.path.relpath(local, local_dir))
      size += os.path.getsize(local)
  return size


class Mirror:
  """A local folder standing in for folder `path`, for writers that append or need local files (metrics.jsonl,
  TensorBoard's event files): `local` is `path` itself on local disk; for a remote `path` it is a temporary
  folder, into which the files named in `fetch` are downloaded first (to be appended to), and whose new or
  changed files `sync()` uploads. `close()` syncs and removes the temporary folder."""

  def __init__(self, path: PathLike, fetch: Sequence[str] = ()):
    self.path, self.remote = os.fspath(path), is_remote(path)
    self.local = tempfile.mkdtemp(prefix="ssdlite_jax_") if self.remote else self.path
    self._uploaded = {}
    for name in fetch if self.remote else ():
      src = epath.Path(self.path) / name
      if src.exists():
        local = download(src, os.path.join(self.local, name))
        stat = os.stat(local)
        self._uploaded[local] = (stat.st_size, stat.st_mtime_ns)

  def sync(self) -> None:
    if not self.remote:
      return
    for folder, _, names in os.walk(self.local):
      for name in names:
        local = os.path.join(folder, name)
        stat = os.stat(local)
        key = (stat.st_size, stat.st_mtime_ns)
        if self._uploaded.get(local) != key:   # new or changed
          upload(local, epath.Path(self.path) / os.path.relpath(local, self.local))
          self._uploaded[local] = key

  def close(self) -> None:
    self.sync()
    if self.remote:
      shutil.rmtree(self.local, ignore_errors=True)
