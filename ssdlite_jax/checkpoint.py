"""Orbax checkpoints: the one directory layout that train.py writes and eval.py, predict.py, port_weights.py
and train.py's init_from read (through loading.load_detector).

Layout: CKPT_DIR/<step>/ with the items
  variables  {"params", "batch_stats"} of the model (StandardSave; BN's num_batches_tracked included)
  model      the model config (JSON), so a checkpoint rebuilds its own model
  train      {"opt_state", "step", "rng"} of the TrainState (train.py only)
and, for train.py's evaluated steps, orbax's per-step metrics (the 12 COCO metrics; the best "AP" is kept).
Saves are atomic: a killed writer leaves no half checkpoint. CKPT_DIR may be local or in object storage
(gs://BUCKET/...: files.py).
"""

import logging
from typing import Any, Dict, Optional, Tuple, Union

import jax
import ml_collections
import orbax.checkpoint as ocp

from ssdlite_jax import files
from ssdlite_jax.detector import with_batch_stats
from ssdlite_jax.zoo import default_config, family_of

# A replicated array is written whole by its first replica unless each of its replicas' slices would hold at least
# this many bytes. orbax's default splits every replicated array among all replicas, one dispatched slice op per
# replica and array: with 8 devices a save of SSDlite's ~370 small tensors took ~7 s on a CPU, whatever the model
# size; these models' largest tensor (1.2 MB) is under the limit, so one device's copy is written as is.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 4 << 20
_absl_logger = logging.getLogger("absl")
_level = _absl_logger.level
_absl_logger.setLevel(logging.ERROR)   # orbax warns that this replaces its default handler, on every program start
try:
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES),
      override=True)
finally:
  _absl_logger.setLevel(_level)


def _variables_manager(ckpt_dir: str, best: bool = False) -> ocp.CheckpointManager:
  """A manager that keeps every step; with `best`, one that ranks the steps saved with metrics by their "AP"."""
  options = (ocp.CheckpointManagerOptions(create=False, best_fn=lambda m: m["AP"], best_mode="max",
                                         keep_checkpoints_without_metrics=True) if best
             else ocp.CheckpointManagerOptions(create=True))
  return ocp.CheckpointManager(files.absolute(ckpt_dir), options=options)


def train_manager(ckpt_dir: str, keep: int) -> ocp.CheckpointManager:
  """train.py's manager: asynchronous saves; keeps the last `keep` steps and the best by metrics["AP"]."""
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(n=keep),
      ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m["AP"], reverse=True, n=1,
                                    keep_checkpoints_without_metrics=False),
  ])
  # best_fn makes orbax write each step's metrics beside it (without, they live in this process only: a resumed
  # run's policy would see the earlier best step as unevaluated, and --step best could not find it).
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True, enable_async_checkpointing=True,
                                         best_fn=lambda m: m["AP"], best_mode="max")
  return ocp.CheckpointManager(files.absolute(ckpt_dir), options=options)


def save_train_state(mngr: ocp.CheckpointManager, state, model_config: ml_collections.ConfigDict,
                     metrics: Optional[Dict[str, float]] = None) -> None:
  """Saves a train_step.TrainState as checkpoint `state.step` (async) unless that step is already saved."""
  if int(state.step) in mngr.all_steps():
    return
  train_items = {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}
  mngr.save(int(state.step), metrics=metrics, force=True, args=ocp.args.Composite(
      variables=ocp.args.StandardSave(state.variables),
      model=ocp.args.JsonSave(model_config.to_dict()),
      train=ocp.args.StandardSave(train_items)))


def restore_train_state(mngr: ocp.CheckpointManager, state, step: int):
  """`state` (a TrainState giving the shapes and shardings) with checkpoint `step`'s values."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = mngr.restore(step, args=ocp.args.Composite(
      variables=ocp.args.StandardRestore(abstract.variables),
      train=ocp.args.StandardRestore({"opt_state": abstract.opt_state, "step": abstract.step,
                                      "rng": abstract.rng})))
  v, t = restored["variables"], restored["train"]
  return state.replace(params=v["params"], batch_stats=v.get("batch_stats", {}), **t)


def save_variables(ckpt_dir: str, step: int, variables, model_config: ml_collections.ConfigDict) -> None:
  """Writes variables + model config as checkpoint `step` and waits for it to be committed."""
  with _variables_manager(ckpt_dir) as mngr:
    mngr.save(step, args=ocp.args.Composite(
        variables=ocp.args.StandardSave(variables),
        model=ocp.args.JsonSave(model_config.to_dict())), force=True)
    mngr.wait_until_finished()


def load_variables(ckpt_dir: str, step: Union[int, str, None] = None
                   ) -> Tuple[Dict[str, Any], ml_collections.ConfigDict, int]:
  """(variables, model config, step) of checkpoint `step` in `ckpt_dir`: a step number, "best" (the highest AP of
  the steps train.py evaluated) or None (the latest)."""
  if not files.isdir(ckpt_dir):
    raise FileNotFoundError(f"{ckpt_dir}: no such checkpoint directory")
  with _variables_manager(ckpt_dir, best=step == "best") as mngr:
    if step == "best":
      step = mngr.best_step()
      if step is None:
        raise FileNotFoundError(f"{ckpt_dir}: no evaluated checkpoint (train.py saves the COCO metrics with the "
                                "steps it evaluates) to pick the best from")
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint in this directory")
    if step not in mngr.all_steps():
      raise FileNotFoundError(f"{ckpt_dir}: no checkpoint for step {step} (have {sorted(mngr.all_steps())})")
    # Restore onto this process's first device whatever devices wrote it (e.g. trained on 8, used on 1).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    meta = ocp.StandardCheckpointer().metadata(mngr.directory / str(step) / "variables")
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          meta.item_metadata.tree)
    restored = mngr.restore(step, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(target), model=ocp.args.JsonRestore()))
  saved = restored["model"]
  cfg = default_config(family_of(saved))   # fields newer than the checkpoint keep their family's defaults
  cfg.update(saved)
  if "backbone_kwargs" in saved:  # the saved backbone's own options, not merged with the default backbone's
    cfg.backbone_kwargs = ml_collections.ConfigDict(saved["backbone_kwargs"])
  return with_batch_stats(restored["variables"]), cfg, step
