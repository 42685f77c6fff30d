"""One way to load a detector: from an orbax checkpoint directory, a torchvision `.pth` or a `.safetensors`, or
released weights by name (weights.py: downloaded once, verified, cached; porting.resolve: ported once).

    detector, variables, step = load_detector("runs/coco/checkpoints")          # step: the latest
    detector, variables, step = load_detector("finetuned_13class.pth")          # step None; 13 classes
    detector, variables, step = load_detector("ssdlite320_mobilenet_v3_large")  # torchvision's COCO weights

A checkpoint carries its own model config. For a torchvision state_dict the model variant is the registered
one (zoo.TORCHVISION_VARIANTS) whose state_dict keys it has, and the class count is read from its shapes
(Detector.num_classes_of); `model_config` fixes the variant (and post-processing settings) instead.
"""

from typing import Any, Dict, Mapping, Optional, Tuple, Union

import ml_collections
import numpy as np

from ssdlite_jax import checkpoint, files, porting, weights
from ssdlite_jax.detector import Detector
from ssdlite_jax.zoo import TORCHVISION_VARIANTS, build_model, layouts


def load_detector(source: str, model_config: Optional[ml_collections.ConfigDict] = None,
                  step: Union[int, str, None] = None) -> Tuple[Detector, Dict[str, Any], Optional[int]]:
  """(detector, variables {"params", "batch_stats"}, step) of a checkpoint directory (step: that step, "best"
  (checkpoint.load_variables) or the latest), of a torchvision state_dict file or of released weights by name
  (weights.FILES; step None). Errors name the file and the keys at fault."""
  source = porting.resolve(source)
  if not files.exists(source):
    raise FileNotFoundError(f"{source}: no such checkpoint directory or weights file, nor a weights name "
                            f"({', '.join(weights.FILES)})")
  if files.isdir(source):
    if model_config is not None:
      raise ValueError(f"{source}: a checkpoint carries its own model config; do not pass model_config")
    variables, cfg, step = checkpoint.load_variables(source, step)
    return build_model(cfg), variables, step
  if step is not None:
    raise ValueError(f"{source}: step={step} applies to checkpoint directories, not to a weights file")
  state_dict = porting.load_state_dict(source)
  try:
    detector = build_model(model_config_for(state_dict, model_config))
    return detector, porting.torch_to_flax(state_dict, detector), None
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None


def model_config_for(state_dict: Mapping[str, np.ndarray],
                     model_config: Optional[ml_collections.ConfigDict] = None) -> ml_collections.ConfigDict:
  """The model config of a torchvision state_dict: `model_config` (default: the registered variant whose keys
  the state_dict has) with num_classes read from its shapes."""
  candidates = ({"the given model config": model_config} if model_config is not None
                else {name: make() for name, make in TORCHVISION_VARIANTS.items()})
  misfits = []
  for name, cfg in candidates.items():
    fits = []
    for cfg in layouts(cfg):   # e.g. Faster R-CNN's FrozenBatchNorm2d and BatchNorm2d key sets
      detector = build_model(cfg)
      expected = [key for _, _, key, _ in porting.key_map(detector)]
      missing = [k for k in expected if k not in state_dict]
      unexpected = sorted(set(state_dict) - set(expected))
      if not missing and not unexpected:
        cfg.num_classes = detector.num_classes_of(state_dict)
        return cfg
      fits.append((len(missing) + len(unexpected), missing, unexpected))
    _, missing, unexpected = min(fits, key=lambda f: f[0])
    misfits.append(f"{name}: {len(missing)} keys missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                   f"(e.g. {unexpected[:3]})")
  raise ValueError("the state_dict fits no known model variant:\n  " + "\n  ".join(misfits))
