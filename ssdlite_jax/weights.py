"""Released weights by name: torchvision's published files, downloaded on first use, verified against the SHA-256
prefix in their file name (as torch.hub does), kept in a cache.

    weights.fetch("ssdlite320_mobilenet_v3_large")   # CACHE/weights/ssdlite320_mobilenet_v3_large_coco-a79551df.pth

Everything that loads weights (loading.load_detector: --weights, --config.init_from; porting.load_state_dict:
--config.init_backbone_from) takes these names, through porting.resolve, which ports the .pth once into a
.safetensors beside it (the same state_dict, read without torch: a name needs torch only on its first use).

Files come from BASE_URL (SSDLITE_JAX_WEIGHTS_URL overrides it, e.g. for a mirror) into CACHE_DIR/weights
(SSDLITE_JAX_CACHE, default ~/.cache/ssdlite_jax). A download goes to a temporary file beside its destination
(files.write_atomically) and is renamed there only when complete and verified: a refused or cut download leaves
nothing behind, and the next use downloads it again.
"""

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request

from ssdlite_jax import files

BASE_URL = "https://download.pytorch.org/models"
# name (torchvision's builder) -> file on BASE_URL, "-<SHA-256 prefix>." in its name
FILES = {
    "ssdlite320_mobilenet_v3_large": "ssdlite320_mobilenet_v3_large_coco-a79551df.pth",
    "ssd300_vgg16": "ssd300_vgg16_coco-b556d3b4.pth",
    "fasterrcnn_mobilenet_v3_large_320_fpn": "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth",
    "fasterrcnn_mobilenet_v3_large_fpn": "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth",
    # ImageNet backbones (--config.init_backbone_from)
    "mobilenet_v3_large": "mobilenet_v3_large-8738ca79.pth",
    "vgg16_features": "vgg16_features-amdegroot-88682ab5.pth",
    "resnet50": "resnet50-0676ba61.pth",
}
_CHUNK = 1 << 20


def cache_dir() -> str:
  return os.path.join(os.path.expanduser(os.environ.get("SSDLITE_JAX_CACHE", "~/.cache/ssdlite_jax")), "weights")


def is_name(source: str) -> bool:
  """Whether `source` means released weights: a name in FILES, and no file or folder of that name exists."""
  return source in FILES and not files.exists(source)


def cache_path(name: str) -> str:
  """Where weights `name`'s .pth is cached."""
  return os.path.join(cache_dir(), FILES[name])


def fetch(name: str) -> str:
  """The cached .pth of weights `name`, downloaded and verified first if it is not there. Errors are one line:
  FileNotFoundError when it cannot be downloaded (naming the URL and where to put the file by hand), ValueError
  when the download is not the published file."""
  file, path = FILES[name], cache_path(name)
  if os.path.exists(path):
    return path
  url = f"{os.environ.get('SSDLITE_JAX_WEIGHTS_URL', BASE_URL).rstrip('/')}/{file}"

  def write(tmp):   # into files.write_atomically's temporary file: kept only if this returns
    with open(tmp, "wb") as out:
      digest, size, expected = _download(url, out, path)
    if expected is not None and size != expected:
      raise FileNotFoundError(f"weights {name!r}: the download of {url} stopped after {size} of {expected} bytes; "
                              "run again to download it again")
    want = re.search(r"-([0-9a-f]+)\.", file)[1]
    if not digest.startswith(want):
      raise ValueError(f"weights {name!r}: {url} is not the published file (SHA-256 {digest[:16]}..., expected "
                       f"{want}...); refused, nothing was kept")
  files.write_atomically(path, write)
  print(f"downloaded {url} to {path}")
  return path


def _download(url: str, out, where: str):
  """Streams `url` into file `out`: (sha256 hex digest, bytes written, Content-Length or None). `where`: the
  cached file's path, named in the error when it cannot be downloaded."""
  try:
    with urllib.request.urlopen(url, timeout=60) as response:
      length = response.headers.get("Content-Length")
      sha, size = hashlib.sha256(), 0
      while chunk := response.read(_CHUNK):
        sha.update(chunk)
        out.write(chunk)
        size += len(chunk)
  except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
    raise FileNotFoundError(f"cannot download {url} ({getattr(e, 'reason', e)}); without network, download it "
                            f"elsewhere and put it at {where}") from None
  return sha.hexdigest(), size, None if length is None else int(length)
