"""Weight porting between torchvision state_dicts and Flax variables, and .pth / .safetensors files.

Conversion rules (torch -> Flax): conv OIHW -> HWIO (depthwise (C,1,k,k) -> (k,k,1,C)); Linear (out, in) -> Dense
(in, out), and a Linear fed torch's NCHW flatten of a [C, 7, 7] map (Faster R-CNN's fc6) -> a Dense fed the NHWC
flatten; BN weight/bias -> params scale/bias; running_mean/var/num_batches_tracked -> batch_stats
mean/var/num_batches_tracked (a model without BatchNorm has an empty batch_stats); FrozenBatchNorm2d's four buffers
-> batch_stats scale/bias/mean/var; bare parameters (VGG's scale_weight) unchanged.
torch is imported only to read or write .pth files.
"""

import collections
import os
import pickle
from typing import Dict, List, Mapping, Tuple

import flax
import jax
import numpy as np

from ssdlite_jax import files, weights
from ssdlite_jax.detector import Detector, with_batch_stats

StateDict = Dict[str, np.ndarray]

# Tensor layouts: (torch -> flax, flax -> torch) per layout name; "" is the same array on both sides.
_FC_GRID = 7   # the RoI feature grid a "linear_nchw" Linear (fc6) flattens


def _nchw_to_nhwc_rows(w):
  o, n = w.shape
  c = n // (_FC_GRID * _FC_GRID)
  return w.reshape(o, c, _FC_GRID, _FC_GRID).transpose(2, 3, 1, 0).reshape(n, o)


def _nhwc_rows_to_nchw(k):
  n, o = k.shape
  c = n // (_FC_GRID * _FC_GRID)
  return k.reshape(_FC_GRID, _FC_GRID, c, o).transpose(3, 2, 0, 1).reshape(o, n)


_LAYOUTS = {
    "": (lambda v: v, lambda v: v),
    "conv": (lambda v: v.transpose(2, 3, 1, 0), lambda v: v.transpose(3, 2, 0, 1)),
    "linear": (lambda v: v.T, lambda v: v.T),
    "linear_nchw": (_nchw_to_nhwc_rows, _nhwc_rows_to_nchw),
}

# (flax collection, flax leaf path under the module, torch key suffix, layout) per kind of module.
_CONV_NOBIAS = (("params", ("kernel",), ".weight", "conv"),)
_CONV = _CONV_NOBIAS + (("params", ("bias",), ".bias", ""),)
_LINEAR = (("params", ("kernel",), ".weight", "linear"), ("params", ("bias",), ".bias", ""))
_LINEAR_NCHW = (("params", ("kernel",), ".weight", "linear_nchw"), ("params", ("bias",), ".bias", ""))
_BN = (
    ("params", ("scale",), ".weight", ""),
    ("params", ("bias",), ".bias", ""),
    ("batch_stats", ("mean",), ".running_mean", ""),
    ("batch_stats", ("var",), ".running_var", ""),
    ("batch_stats", ("num_batches_tracked",), ".num_batches_tracked", ""),
)
_FROZEN_BN = tuple(("batch_stats", leaf, suffix, "") for leaf, suffix in (
    (("scale",), ".weight"), (("bias",), ".bias"), (("mean",), ".running_mean"), (("var",), ".running_var")))


def _conv_then(norm):
  """torchvision's Conv2dNormActivation: Sequential(conv, norm) as ConvBNAct's "conv" and "bn"."""
  return (("params", ("conv", "kernel"), ".0.weight", "conv"),) + tuple(
      (coll, ("bn",) + leaf, ".1" + suffix, layout) for coll, leaf, suffix, layout in norm)


# ResNet names the two parts itself (conv1 / bn1): a "conv_nobias" and a "bn" entry there.
_TENSOR = (("params", (), "", ""),)  # a bare parameter (SSD's L2Norm scale_weight): same shape both sides
_KINDS = {"conv_bn": _conv_then(_BN), "conv_frozen_bn": _conv_then(_FROZEN_BN), "conv": _CONV, "tensor": _TENSOR,
          "conv_nobias": _CONV_NOBIAS, "bn": _BN, "linear": _LINEAR, "linear_nchw": _LINEAR_NCHW}


def expand(modules) -> List[Tuple[str, Tuple[str, ...], str, str]]:
  """{flax module path: (torch prefix, kind)} -> [(collection, flax path, torch key, layout)]."""
  return [(coll, path + leaf, prefix + suffix, layout)
          for path, (prefix, kind) in modules.items() for coll, leaf, suffix, layout in _KINDS[kind]]


def key_map(detector: Detector) -> List[Tuple[str, Tuple[str, ...], str, str]]:
  """[(collection, flax path, torch key, layout)] for every tensor, in torchvision's state_dict order."""
  return expand(detector.torchvision_modules())


def shapes(variables) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """{(collection,) + flax path: shape} of a variables pytree (arrays or ShapeDtypeStructs)."""
  return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(variables).items()}


def _to_flax_leaf(value: np.ndarray, layout: str, key: str) -> np.ndarray:
  if layout:
    return np.ascontiguousarray(_LAYOUTS[layout][0](value))
  if value.dtype == np.int64:  # num_batches_tracked
    if abs(int(value)) > np.iinfo(np.int32).max:
      raise ValueError(f"{key}: value {int(value)} does not fit in int32")
    return value.astype(np.int32)
  return value


def torch_to_flax(state_dict: Mapping[str, np.ndarray], detector: Detector,
                  skip_mismatched: bool = False, rng=None):
  """Flax variables {"params", "batch_stats"} from a torchvision state_dict (numpy arrays).

  Missing, unexpected or mis-shaped keys raise a ValueError naming every offending key (both shapes).
  With `skip_mismatched` (fine-tuning to another num_classes), tensors that are missing or mis-shaped keep a
  fresh initialisation from `rng` and unexpected keys are ignored; returns (variables, problems) then, one
  line per skipped key.
  """
  entries = key_map(detector)
  expected = {torch_key for _, _, torch_key, _ in entries}
  problems = [f"unexpected key {k} {tuple(np.shape(v))}" for k, v in state_dict.items() if k not in expected]
  flat, missing = read(state_dict, entries, shapes(jax.eval_shape(detector.init, jax.random.key(0))))
  problems += missing
  if not skip_mismatched:
    if problems:
      raise ValueError("state_dict does not match the model:\n  " + "\n  ".join(problems))
    return with_batch_stats(flax.traverse_util.unflatten_dict(flat))
  fresh = flax.traverse_util.flatten_dict(detector.init(rng if rng is not None else jax.random.key(0)))
  merged = {k: flat.get(k, np.asarray(v)) for k, v in fresh.items()}
  return with_batch_stats(flax.traverse_util.unflatten_dict(merged)), problems


def read(state_dict, entries, want_shapes):
  """({(collection,) + flax path: value} of `entries` (expand's) found in `state_dict` with the flax shape
  `want_shapes` (shapes') gives them, problems: one line per missing or mis-shaped key)."""
  flat, problems = {}, []
  for coll, path, torch_key, layout in entries:
    want = want_shapes[(coll,) + path]
    if torch_key not in state_dict:
      problems.append(f"missing key {torch_key} (expected shape {_torch_shape(want, layout)})")
      continue
    value = _to_flax_leaf(np.asarray(state_dict[torch_key]), layout, torch_key)
    if value.shape != want:
      problems.append(f"shape mismatch for {torch_key}: checkpoint {tuple(state_dict[torch_key].shape)}, "
                      f"model {_torch_shape(want, layout)}")
      continue
    flat[(coll,) + path] = value
  return flat, problems


def import_backbone(state_dict: Mapping[str, np.ndarray], detector: Detector, variables) -> Tuple[Dict, int]:
  """`variables` with the backbone's tensors taken from an ImageNet classifier's state_dict in torchvision's
  layout (VGG16: vgg16_features-amdegroot-88682ab5.pth, whose `features.*` are used; keys the backbone does not
  map, e.g. that file's NaN classifier, are ignored). Returns (variables, tensors imported); a missing or
  mis-shaped key raises a ValueError naming it."""
  modules = detector.imagenet_modules()
  if not modules:
    raise ValueError(f"model.backbone={detector.config.get('backbone')!r} has no ImageNet weight import")
  entries = expand(modules)
  flat, problems = read(state_dict, entries, shapes(variables))
  if problems:
    raise ValueError("not the backbone's ImageNet weights:\n  " + "\n  ".join(problems))
  merged = flax.traverse_util.flatten_dict(jax.device_get(variables))
  merged.update(flat)
  return with_batch_stats(flax.traverse_util.unflatten_dict(merged)), len(flat)


def _torch_shape(flax_shape, layout):
  return tuple(_LAYOUTS[layout][1](np.empty(flax_shape, np.bool_)).shape)


def flax_to_torch(variables, detector: Detector) -> StateDict:
  """A torchvision state_dict (ordered, numpy) from Flax variables; loads with strict=True."""
  flat = flax.traverse_util.flatten_dict(jax.device_get(variables))
  out = collections.OrderedDict()
  for coll, path, torch_key, layout in key_map(detector):
    value = _LAYOUTS[layout][1](np.asarray(flat[(coll,) + path]))
    if path[-1] == "num_batches_tracked":
      value = value.astype(np.int64)
    out[torch_key] = np.array(value, order="C")  # not ascontiguousarray: it makes 0-d counters 1-d
  return out


def reads_torch(source: str) -> bool:
  """Whether loading weights from `source` (a config's init_from / init_backbone_from: '', a checkpoint directory,
  a .safetensors or a .pth file, a weights name) needs torch: a file that is not .safetensors, a name not yet
  ported (resolve)."""
  if weights.is_name(source):
    return not os.path.exists(_ported(source))
  return bool(source) and not files.isdir(source) and not source.endswith(".safetensors")


def _ported(name: str) -> str:
  return os.path.splitext(weights.cache_path(name))[0] + ".safetensors"


def resolve(source: str) -> str:
  """`source`, or for a weights name (weights.is_name) its state_dict in a .safetensors in the cache: ported once
  from the downloaded .pth (weights.fetch), so that later uses read it without torch."""
  if not weights.is_name(source):
    return source
  ported = _ported(source)
  if not os.path.exists(ported):
    pth = weights.fetch(source)
    save_state_dict(_read_state_dict(pth, pth), ported)
    print(f"ported {pth} to {ported}: later uses read it without torch")
  return ported


def load_state_dict(path: str) -> StateDict:
  """Reads a .pth (torch.load with weights_only=True) or .safetensors file into numpy arrays.

  A .pth may hold the state_dict itself or a training checkpoint dict with a "model" entry. `path` may be in
  object storage (read through a local copy) or a weights name (resolve).
  """
  path = resolve(path)
  if not files.exists(path):
    raise FileNotFoundError(f"{path}: no such file")
  with files.local_file(path) as local:
    return _read_state_dict(local, path)


def _read_state_dict(local: str, path: str) -> StateDict:
  """load_state_dict of the local file `local`; errors name `path`."""
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    try:
      return dict(load_file(local))
    except Exception as e:   # safetensors' SafetensorError: a truncated or foreign file
      raise ValueError(f"{path}: not a readable .safetensors file ({e}); a download cut short gives this: "
                       "fetch it again") from None
  try:
    import torch
  except ModuleNotFoundError:   # e.g. the ONNX venv (requirements-onnx.txt), which has no torch
    raise ModuleNotFoundError(
        f"{path}: reading a .pth needs torch (pip install '.[torch]'). Or, where torch is installed, turn it "
        f"once into a checkpoint (python port_weights.py to-flax --torch {path} --out DIR) or a .safetensors "
        f"file, which load without torch") from None
  _check_pth_header(local, path)
  try:
    obj = torch.load(local, map_location="cpu", weights_only=True)
  except PermissionError:
    raise
  except (RuntimeError, EOFError, KeyError, OSError) as e:   # torch's readers on a truncated or corrupt file
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"{path}: unreadable, truncated or corrupt ({detail}); fetch it again") from None
  except pickle.UnpicklingError as e:
    raise ValueError(
        f"{path}: refused: this pickle holds more than tensors (code or arbitrary objects), and it is "
        f"only read with torch.load(weights_only=True), so nothing in it was run. Re-save just the "
        f"state_dict (torch.save(model.state_dict(), ...)) or use .safetensors. Detail: {e}") from None
  if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
    obj = obj["model"]
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a state_dict (dict of tensors), got {type(obj).__name__}")
  bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
  if bad:
    raise ValueError(f"{path}: entries that are not tensors: {bad[:10]}")
  return {k: v.detach().cpu().numpy() for k, v in obj.items()}


def _check_pth_header(local: str, path: str) -> None:
  """Raises a ValueError naming `path` unless it starts as torch.save writes: a zip archive, or a pickle (the
  legacy format). An HTML error page saved as .pth would otherwise reach torch's unpickler and be reported as a
  refused pickle. (`local`: the file's local copy.)"""
  with open(local, "rb") as f:
    head = f.read(64)
  if not head:
    raise ValueError(f"{path}: empty file; a download cut short gives this: fetch it again")
  if not head.startswith((b"PK\x03\x04", b"\x80")):
    kind = "an HTML page, e.g. a server's error page" if head.lstrip()[:1] == b"<" else "not a file torch.save wrote"
    raise ValueError(f"{path}: not a PyTorch checkpoint: it starts with {head[:24]!r} ({kind}); fetch it again")


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str) -> None:
  """Writes a state_dict to .pth (torch.save) or .safetensors, atomically (files.write_atomically)."""
  if path.endswith(".safetensors"):
    from safetensors.numpy import save_file
    write = lambda tmp: save_file({k: np.array(v, order="C") for k, v in state_dict.items()}, tmp)
  elif path.endswith((".pth", ".pt")):
    import torch
    write = lambda tmp: torch.save(
        collections.OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in state_dict.items()), tmp)
  else:
    raise ValueError(f"{path}: unknown weight format; use .pth, .pt or .safetensors")
  files.write_atomically(path, write)


def transfer(variables, source: Detector, target: Detector, rng) -> Tuple[Dict, List[str]]:
  """`source`'s variables as `target`'s (fine-tuning, e.g. to another num_classes): every tensor whose
  torchvision key and shape agree is copied, the others keep a fresh initialisation from `rng`.
  Returns (variables, problems), one line per tensor not copied."""
  return torch_to_flax(flax_to_torch(variables, source), target, skip_mismatched=True, rng=rng)
