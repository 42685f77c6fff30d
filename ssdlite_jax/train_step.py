"""Data-parallel training step with torchvision's DDP semantics (references/detection, 8 x 24 images).

One `jax.jit(jax.shard_map(...))` over a 1-D `data` mesh: each device computes the detector's loss
(Detector.loss) on its slice of the batch, with BatchNorm statistics over its own images (or over the whole
batch with sync BN) and the loss normalised as the family does per GPU (SSD: by its own number of positives);
gradients, loss terms and the BN running statistics are then averaged across devices with `lax.pmean`, as DDP averages
gradients (for the float BN statistics, which DDP leaves per rank, the average is the natural single
copy; `num_batches_tracked` is equal everywhere and stays int32). The state is replicated
(`NamedSharding(mesh, P())`), the batch split along its leading axis (`P('data')`).

A step whose mean loss or averaged-gradient norm is not finite is a no-op: the returned state is the
input state (step, params, BN statistics and optimizer state all unchanged) and
`metrics["finite"]` is False, so the training loop can stop with a clean last state.
"""

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from ssdlite_jax.distributed import AXIS
from ssdlite_jax.detector import Detector


@flax.struct.dataclass
class TrainState:
  """Replicated training state: step (int32 scalar, updates applied), params and batch_stats (the
  model variables), opt_state (optax state of `params`), rng (PRNG key; the step passes the loss
  fold_in(rng, step) folded with the device index, for the family's sampling, and never advances it)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array

  @property
  def variables(self) -> Dict[str, Any]:
    """{"params", "batch_stats"} as the detector's module takes them."""
    return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(detector: Detector, tx: optax.GradientTransformation, rng,
                       mesh: jax.sharding.Mesh, variables: Optional[Dict[str, Any]] = None) -> TrainState:
  """Step-0 TrainState replicated over `mesh` (every process must pass the same values).

  variables: {"params", "batch_stats"} (e.g. ported torchvision weights; copied, so donating the
  state never invalidates them) or None for a fresh torchvision initialisation drawn from `rng`.
  The optimizer state is `tx.init(params)`; state.rng is what remains of `rng` after the init draw.
  """
  rng, init_rng = jax.random.split(rng)
  if variables is None:
    variables = detector.init(init_rng)
  return _state_from(tx, mesh)(variables, rng)


@functools.lru_cache(maxsize=16)
def _state_from(tx: optax.GradientTransformation, mesh: jax.sharding.Mesh):
  """jitted (variables, rng) -> step-0 TrainState replicated over `mesh`: one program per optimizer and mesh (tx.init
  run eagerly would compile a zeros op per tensor shape); jit, not device_put, which cannot target devices of other
  processes (multi-host)."""
  def state_from(variables, rng):
    variables, rng = jax.tree.map(jnp.copy, (variables, rng))   # `variables` stay valid when the state is donated
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]), rng=rng)
  return jax.jit(state_from, out_shardings=NamedSharding(mesh, P()))


def _mean_float_stats(batch_stats):
  """pmean of the float BN running statistics; the int32 counters are equal on every device."""
  return jax.tree.map(
      lambda x: x if jnp.issubdtype(x.dtype, jnp.integer) else lax.pmean(x, AXIS), batch_stats)


def make_train_step(detector: Detector, tx: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array], mesh: jax.sharding.Mesh
                    ) -> Callable[[TrainState, Dict[str, jax.Array]], Tuple[TrainState, Dict[str, jax.Array]]]:
  """jit-compiled `step(state, batch) -> (state, metrics)`; `state` is donated.

  batch: shard_batch output with the detector's BATCH_KEYS ("image" [B, H, W, 3] in [0, 1], "boxes" [B, M, 4]
  xyxy px, "labels" [B, M] int32, "mask" [B, M] bool, ...; other keys are ignored); B a multiple of the mesh size.
  One program per batch shape (a family that resizes per image trains on one canvas per aspect-ratio group).
  The detector's module runs as built: built with bn_axis_name=distributed.AXIS, its BN statistics are
  over the whole batch (sync BN), else over each device's images.
  metrics (replicated scalars, left on device): loss (mean over devices), each of the detector's loss terms
  (means of the per-device losses), its counts (sums over devices; SSD: num_positives), lr (of this update),
  grad_norm (global norm of the averaged gradient), finite (bool; False = update skipped, see module doc).
  """
  if detector.bn_axis_name not in (None, AXIS):
    raise ValueError(f"the detector's bn_axis_name={detector.bn_axis_name!r}: the step maps axis {AXIS!r}")
  sync_bn = detector.bn_axis_name == AXIS

  def per_device(state, batch):
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), lax.axis_index(AXIS))

    def loss_fn(params):
      loss = detector.loss({"params": params, "batch_stats": state.batch_stats}, batch, rng)
      return loss.total, loss

    # Differentiate per-device copies of the params; the explicit pmean below is DDP's all-reduce.
    params = lax.pcast(state.params, AXIS, to="varying")
    (total, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grads = lax.pmean(grads, AXIS)
    batch_stats = loss.batch_stats if sync_bn else _mean_float_stats(loss.batch_stats)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = {
        "loss": lax.pmean(total, AXIS),
        **{k: lax.pmean(v, AXIS) for k, v in loss.terms.items()},
        **{k: lax.psum(v, AXIS) for k, v in loss.counts.items()},
        "lr": jnp.asarray(schedule(state.step), jnp.float32),
        "grad_norm": optax.tree.norm(grads),
    }
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    metrics["finite"] = finite
    new = (state.step + 1, optax.apply_updates(state.params, updates), batch_stats, opt_state)
    old = (state.step, state.params, state.batch_stats, state.opt_state)
    step, params, batch_stats, opt_state = jax.tree.map(
        lambda n, o: jnp.where(finite, n, o), new, old)
    return state.replace(step=step, params=params, batch_stats=batch_stats,
                         opt_state=opt_state), metrics

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()))

  def step(state, batch):
    return sharded(state, {k: batch[k] for k in detector.BATCH_KEYS})

  return jax.jit(step, donate_argnums=0)
