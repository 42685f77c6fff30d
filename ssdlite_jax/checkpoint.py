"""Orbax checkpoints: one CheckpointManager directory shared by train.py, eval.py, predict.py and
port_weights.py.

Layout: CKPT_DIR/<step>/{variables, model[, train, meta]}: `variables` = {"params", "batch_stats"}
(StandardSave), `model` = the model config as JSON, `train` = optimizer state and counters (train.py only),
`meta` = JSON extras (metrics). Saves are atomic: a killed writer leaves no half checkpoint.
"""

import os
from typing import Any, Dict, Optional, Tuple

import jax
import ml_collections
import orbax.checkpoint as ocp

from ssdlite_jax.models import default_model_config


def manager(ckpt_dir: str, max_to_keep: Optional[int] = None, best_fn=None,
            save_interval_steps: int = 1) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, best_fn=best_fn,
      best_mode="max", keep_checkpoints_without_metrics=True, create=True)
  return ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=options)


def save_variables(ckpt_dir: str, step: int, variables, model_config: ml_collections.ConfigDict) -> None:
  """Writes variables + model config as checkpoint `step` and waits for it to be committed."""
  with manager(ckpt_dir) as mngr:
    mngr.save(step, args=ocp.args.Composite(
        variables=ocp.args.StandardSave(variables),
        model=ocp.args.JsonSave(model_config.to_dict())), force=True)
    mngr.wait_until_finished()


def load_variables(ckpt_dir: str, step: Optional[int] = None
                   ) -> Tuple[Dict[str, Any], ml_collections.ConfigDict, int]:
  """(variables, model config, step) of checkpoint `step` (default: the latest) in `ckpt_dir`."""
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"{ckpt_dir}: no such checkpoint directory")
  with manager(ckpt_dir) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint in this directory")
    if step not in mngr.all_steps():
      raise FileNotFoundError(f"{ckpt_dir}: no checkpoint for step {step} (have {sorted(mngr.all_steps())})")
    # Restore onto this process's first device whatever devices wrote it (e.g. trained on 8, used on 1).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    meta = ocp.StandardCheckpointer().metadata(os.path.join(mngr.directory, str(step), "variables"))
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          meta.item_metadata.tree)
    restored = mngr.restore(step, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(target), model=ocp.args.JsonRestore()))
  cfg = default_model_config()
  cfg.update(restored["model"])
  return dict(restored["variables"]), cfg, step
