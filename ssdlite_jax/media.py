"""Images and videos for predict.py: found (files, folders at any depth, glob patterns, http(s) URLs; local or
gs://), decoded one at a time (images turned upright by their EXIF orientation, video frames by their stream's
display matrix, as viewers show them) and, annotated, written back (JPEG images, H.264 .mp4 videos), each output
complete or absent.

Videos go through PyAV (FFmpeg's libraries in a wheel: `pip install av`), imported when a video is met.
"""

import contextlib
import fractions
import glob
import io
import os
import urllib.parse
import urllib.request
from typing import Callable, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
from PIL import Image, ImageOps

from ssdlite_jax import files

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".avi", ".m4v", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".webm")


class Picture(NamedTuple):
  """One image to run: a whole image file (frame None) or a video's frame (0-based index, fps its rate)."""
  path: str
  rel: str                 # where its drawing goes, relative to the --draw folder (with the source's extension)
  image: np.ndarray        # H x W x 3 uint8 RGB, upright
  frame: Optional[int] = None
  fps: Optional[fractions.Fraction] = None


def is_url(path: str) -> bool:
  return path.startswith(("http://", "https://"))


def _extension(path: str) -> str:
  return os.path.splitext(urllib.parse.urlparse(path).path if is_url(path) else path)[1].lower()


def is_video(path: str) -> bool:
  return _extension(path) in VIDEO_EXTENSIONS


def find(inputs: List[str]) -> List[Tuple[str, str]]:
  """(path, path relative to where it was found) of each input: a file or URL as given (relative: its name), a
  folder's image and video files (IMAGE_EXTENSIONS, VIDEO_EXTENSIONS; any depth, sorted), a local glob pattern's
  matches. A ValueError names an input that matches nothing."""
  found = []
  for given in inputs:
    if is_url(given):
      found.append((given, os.path.basename(urllib.parse.urlparse(given).path) or "image"))
    elif files.isdir(given):
      media = sorted(p for p in files.walk_files(given) if _extension(p) in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
      if not media:
        raise ValueError(f"{given}: a folder without image or video files ({', '.join(IMAGE_EXTENSIONS)}, "
                         f"{', '.join(VIDEO_EXTENSIONS)})")
      found += [(p, os.path.relpath(p, given)) for p in media]
    elif not files.is_remote(given) and glob.has_magic(given):
      matches = sorted(glob.glob(given, recursive=True))
      if not matches:
        raise ValueError(f"{given}: no file matches this pattern")
      found += [(p, os.path.basename(p)) for p in matches]
    else:
      found.append((given, os.path.basename(given)))
  return found


def read_image(path: str) -> np.ndarray:
  """H x W x 3 uint8 RGB of an image file or http(s) URL (EXIF-rotated); a ValueError naming it if unreadable."""
  try:
    if is_url(path):
      with urllib.request.urlopen(path, timeout=60) as response:
        data = io.BytesIO(response.read())
    else:
      data = files.open_file(path, "rb")
    with data as f, Image.open(f) as im:
      im.load()
      return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
  except (OSError, SyntaxError, ValueError) as e:   # urllib's URLError and HTTPError are OSErrors
    raise ValueError(f"{path}: cannot read image ({getattr(e, 'reason', e)})") from None


def _av(path: str):
  try:
    import av
  except ModuleNotFoundError:
    raise ValueError(f"{path}: reading or writing videos needs PyAV (pip install av)") from None
  return av


def read_video(path: str) -> Iterator[Tuple[np.ndarray, fractions.Fraction]]:
  """(H x W x 3 uint8 RGB frame, upright; the stream's frames per second) for each frame of the first video stream
  of a video file or URL, decoded one at a time. A ValueError names the file if it cannot be read (also part-way)
  or holds no frame."""
  av = _av(path)
  with contextlib.ExitStack() as stack:
    try:
      container = stack.enter_context(av.open(path if is_url(path) else stack.enter_context(files.local_file(path))))
      if not container.streams.video:
        raise ValueError("no video stream")
      stream = container.streams.video[0]
      fps = stream.average_rate or stream.guessed_rate or fractions.Fraction(30)
      count = 0
      for frame in container.decode(stream):
        # frame.rotation: degrees counterclockwise that the display matrix turns the frame (phones: -90 / 90)
        yield np.ascontiguousarray(np.rot90(frame.to_ndarray(format="rgb24"), round(frame.rotation / 90) % 4)), fps
        count += 1
      if not count:
        raise ValueError("no frame")
    except (av.FFmpegError, OSError, ValueError) as e:
      raise ValueError(f"{path}: cannot read video ({e})") from None


def read(found: List[Tuple[str, str]], on_error: Callable[[ValueError], None]) -> Iterator[Picture]:
  """The Pictures of `find`'s (path, rel) list, in order, decoded as they are asked for: one per image file, one per
  video frame. A source that cannot be read goes (a ValueError naming it) to on_error, which raises, or returns to
  go on with the next source."""
  for path, rel in found:
    try:
      if is_video(path):
        for k, (image, fps) in enumerate(read_video(path)):
          yield Picture(path, rel, image, k, fps)
      else:
        yield Picture(path, rel, read_image(path))
    except ValueError as e:
      on_error(e)


class VideoWriter:
  """Frames (H x W x 3 uint8 RGB, all of one size) into an H.264 .mp4 (yuv420p, which needs even sides: an odd
  side gets one black row or column) at `fps` frames per second, made in a temporary local file that `close()`
  puts at `path` (files.writing); `close(failed=True)` leaves `path` as it was."""

  def __init__(self, path: str, fps: fractions.Fraction):
    self.path, self._av, self._stack = path, _av(path), contextlib.ExitStack()
    self._container = self._stack.enter_context(self._av.open(self._stack.enter_context(files.writing(path)), "w"))
    self._fps, self._stream = fps, None

  def write(self, image: np.ndarray) -> None:
    h, w = image.shape[:2]
    if self._stream is None:
      self._stream = self._container.add_stream("libx264", rate=self._fps)
      self._stream.width, self._stream.height, self._stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
    if h % 2 or w % 2:
      image = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)))
    self._container.mux(self._stream.encode(self._av.VideoFrame.from_ndarray(image, format="rgb24")))

  def close(self, failed: bool = False) -> None:
    if failed:
      self._stack.__exit__(RuntimeError, RuntimeError("not finished"), None)   # files.writing drops the file
      return
    if self._stream is not None:
      self._container.mux(self._stream.encode())   # the encoder's delayed frames
    self._stack.close()


class Drawings:
  """predict.py --draw's outputs under `folder`, each complete or absent: an image at folder/REL.jpg, a video's
  frames (given in order) as folder/REL.mp4 at its frame rate. As a context manager it finishes the video being
  written at the end, or drops it on an exception."""

  def __init__(self, folder: str):
    self.folder, self._video = folder, None

  def add(self, picture: Picture, drawn: Image.Image) -> None:
    out = os.path.join(self.folder, os.path.splitext(picture.rel)[0])
    if not picture.frame:   # an image or a video's first frame: the video before it is complete
      self._finish()
    if picture.frame is None:
      files.write_atomically(out + ".jpg", lambda tmp: drawn.save(tmp, format="JPEG", quality=92))
      return
    if self._video is None:
      self._video = VideoWriter(out + ".mp4", picture.fps)
    self._video.write(np.asarray(drawn))

  def _finish(self, failed: bool = False) -> None:
    if self._video is not None:
      self._video, video = None, self._video
      video.close(failed)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *_):
    self._finish(failed=exc_type is not None)
