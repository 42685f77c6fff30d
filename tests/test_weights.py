"""Weights by name (ssdlite_jax/weights.py) against an HTTP server on localhost serving generated files: download,
verification against the hash in the file name, the cache and its ported .safetensors, a corrupt and a cut
download, no network, an unknown name."""

import hashlib
import os
import sys

import numpy as np
import pytest

from ssdlite_jax import porting, weights
from ssdlite_jax.loading import load_detector
from tests.helpers import Server, import_or_skip
from tests.torch_reference import random_torchvision_ssdlite

pytestmark = pytest.mark.torch

NAME = "ssdlite320_mobilenet_v3_large"


@pytest.fixture(scope="module")
def published(tmp_path_factory):
  """A random torchvision ssdlite320 saved as torch.save does, named as torchvision names its files (the first 8
  hex digits of its SHA-256), served on localhost: (server, file name, the served folder)."""
  torch = import_or_skip("torch")
  root = tmp_path_factory.mktemp("server")
  model = random_torchvision_ssdlite(seed=3)
  torch.save(model.state_dict(), root / "w.pth")
  digest = hashlib.sha256((root / "w.pth").read_bytes()).hexdigest()
  name = f"ssdlite320_mobilenet_v3_large_coco-{digest[:8]}.pth"
  os.rename(root / "w.pth", root / name)
  (root / "ssdlite320_mobilenet_v3_large_coco-00000000.pth").write_bytes((root / name).read_bytes())  # a corrupt one
  server = Server(str(root))
  yield server, name, root
  server.shutdown()


@pytest.fixture
def table(published, tmp_path, monkeypatch):
  """weights.FILES and the base URL pointed at the local server, the cache in tmp_path; returns set(file)."""
  server, _, _ = published
  monkeypatch.setenv("SSDLITE_JAX_WEIGHTS_URL", server.url)
  monkeypatch.setenv("SSDLITE_JAX_CACHE", str(tmp_path / "cache"))
  return lambda file: monkeypatch.setitem(weights.FILES, NAME, file)


def cached(tmp_path):
  folder = tmp_path / "cache" / "weights"
  return sorted(os.listdir(folder)) if folder.exists() else []


def test_a_name_downloads_once_is_ported_once_and_loads_as_the_file(published, table, tmp_path, monkeypatch):
  """The name downloads the published file into the cache (byte for byte), ports it once into a .safetensors of
  the same state_dict and loads as the .pth does; later uses read that .safetensors: no second request, no torch
  (even with the .pth gone)."""
  import jax
  server, file, root = published
  table(file)
  ported = file.replace(".pth", ".safetensors")
  assert porting.reads_torch(NAME)   # train.py imports torch first for it (before TensorFlow)
  detector, variables, step = load_detector(NAME)
  assert not porting.reads_torch(NAME)
  assert step is None and detector.config.num_classes == 91
  assert cached(tmp_path) == [file, ported] and server.requests.count(f"/{file}") == 1
  assert (tmp_path / "cache" / "weights" / file).read_bytes() == (root / file).read_bytes()
  want_state = porting.load_state_dict(str(root / file))
  got_state = porting.load_state_dict(str(tmp_path / "cache" / "weights" / ported))
  assert sorted(got_state) == sorted(want_state)   # (.safetensors sorts its keys)
  for k, v in want_state.items():
    assert got_state[k].dtype == v.dtype and got_state[k].shape == v.shape and np.array_equal(got_state[k], v), k
  _, want, _ = load_detector(str(root / file))
  (tmp_path / "cache" / "weights" / file).unlink()
  monkeypatch.setitem(sys.modules, "torch", None)   # `import torch` raises ModuleNotFoundError
  for again in (load_detector(NAME)[1], load_detector(NAME)[1]):
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(want), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the state_dict reader (--config.init_backbone_from) takes names too
  got = porting.load_state_dict(NAME)
  assert sorted(got) == sorted(want_state) and all(np.array_equal(got[k], want_state[k]) for k in want_state)
  assert server.requests.count(f"/{file}") == 1 and cached(tmp_path) == [ported]


def test_a_corrupt_download_is_refused_and_nothing_is_cached(table, tmp_path):
  table("ssdlite320_mobilenet_v3_large_coco-00000000.pth")
  with pytest.raises(ValueError, match=r"is not the published file \(SHA-256 [0-9a-f]{16}\.\.\., expected "
                                       r"00000000\.\.\.\); refused, nothing was kept"):
    load_detector(NAME)
  assert cached(tmp_path) == []


def test_a_cut_download_leaves_nothing_and_the_next_use_downloads_it_again(published, table, tmp_path):
  server, file, _ = published
  table(file)
  server.cut = True
  try:
    with pytest.raises(FileNotFoundError, match=r"stopped after \d+ of \d+ bytes; run again"):
      load_detector(NAME)
  finally:
    server.cut = False
  assert cached(tmp_path) == []
  load_detector(NAME)
  assert cached(tmp_path) == [file, file.replace(".pth", ".safetensors")]


def test_without_network_the_error_names_the_url_and_where_to_put_the_file(published, table, tmp_path,
                                                                            monkeypatch):
  _, file, _ = published
  table(file)
  monkeypatch.setenv("SSDLITE_JAX_WEIGHTS_URL", "http://127.0.0.1:9")   # the discard port: nothing listens
  with pytest.raises(FileNotFoundError) as error:
    load_detector(NAME)
  message = str(error.value)
  assert message.startswith(f"cannot download http://127.0.0.1:9/{file} (") and "\n" not in message
  assert message.endswith(f"download it elsewhere and put it at {tmp_path / 'cache' / 'weights' / file}")


def test_an_unknown_name_lists_the_known_ones():
  with pytest.raises(FileNotFoundError, match="ssdlite999: no such checkpoint directory or weights file, nor a "
                                              "weights name \\(ssdlite320_mobilenet_v3_large, ssd300_vgg16, "):
    load_detector("ssdlite999")
