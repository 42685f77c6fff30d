"""Processes, the device mesh and batch sharding: what a data-parallel program sets up before its step.

The mesh is 1-D, axis AXIS ('data'), over every device of every process; batches are global arrays split
along their leading axis, each process contributing its own rows.
"""

import collections
import os
import signal
from typing import Any, Dict, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXIS = "data"
_barrier_counts = collections.Counter()


def maybe_initialize_distributed() -> bool:
  """Calls `jax.distributed.initialize()` when this process is one of several; returns whether it did.

  Call it first, before anything touches a JAX device. Detected launches: JAX_COORDINATOR_ADDRESS
  (with JAX_NUM_PROCESSES and JAX_PROCESS_ID), SLURM (SLURM_NTASKS > 1), Open MPI
  (OMPI_COMM_WORLD_SIZE > 1) and multi-host Cloud TPU slices (several TPU_WORKER_HOSTNAMES); JAX
  auto-detects the rest of the setup in each case. A single-process launch does nothing.
  """
  env = os.environ
  if jax.distributed.is_initialized():
    return False
  # Cross-process collectives between CPU devices (tests, CPU clusters); no effect on GPU/TPU.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if env.get("JAX_COORDINATOR_ADDRESS"):
    num = env.get("JAX_NUM_PROCESSES")
    pid = env.get("JAX_PROCESS_ID")
    jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=None if num is None else int(num),
                               process_id=None if pid is None else int(pid))
    return True
  if (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
      or "," in env.get("TPU_WORKER_HOSTNAMES", "")):
    jax.distributed.initialize()
    return True
  return False


def wait_for_all_processes(name: str, timeout_s: float = 3600.0) -> None:
  """Barrier of every process through the coordination service (no device collective); no-op on one process.

  Collectives between CPU processes (gloo) give up when a peer joins more than 30 s late, as one that is
  still compiling does; call this before such a collective to wait up to `timeout_s` instead. Every process
  must make the same sequence of calls (the n-th call with `name` is barrier "name/n").
  """
  if jax.process_count() == 1:
    return
  _barrier_counts[name] += 1
  # The jax.distributed client: JAX has no public barrier that avoids a device collective.
  from jax._src import distributed as jax_distributed
  jax_distributed.global_state.client.wait_at_barrier(f"{name}/{_barrier_counts[name]}", int(timeout_s * 1000))


class Preemption:
  """SIGTERM, acted on at the same step by every process: `reached(step)` says whether to save `step` and stop.

  Create it before `maybe_initialize_distributed` (a SIGTERM during the set-up counts too). One process: the
  signal sets a flag, read at the next step. Several: a pod's hosts get their SIGTERM at different moments, and
  a checkpoint that one process saves at step N while another is at N + 1 never completes; JAX's preemption
  sync manager (the jax.distributed coordination service, whose handler takes over SIGTERM) tells every process
  of a SIGTERM on any of them and picks one step that all reach (`reached_preemption_sync_point`).
  """

  def __init__(self):
    self.signal = None
    signal.signal(signal.SIGTERM, self._caught)

  def _caught(self, signum, frame):
    del frame
    self.signal = signum

  def start(self) -> None:
    """After `maybe_initialize_distributed`: a SIGTERM caught before jax.distributed started is handed on to it."""
    if jax.process_count() > 1 and self.signal is not None:
      os.kill(os.getpid(), self.signal)

  def reached(self, step: int) -> bool:
    """Whether to save `step` (the number of updates done) and stop; the same answer on every process."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signal is not None


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """1-D mesh named 'data' over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=devices)


def shard_batch(batch: Dict[str, Any], mesh: jax.sharding.Mesh) -> Dict[str, jax.Array]:
  """Global arrays split along axis 0 over the mesh from this process's local batch (numpy).

  Each process passes its own images ([B_local, ...] per key); the global batch is their
  concatenation in process order. B_local must be a multiple of this process's devices in the mesh.
  """
  sharding = NamedSharding(mesh, P(AXIS))
  num_local = len(mesh.local_devices)
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.shape[0] % num_local:
      raise ValueError(f"batch[{key!r}] has {value.shape[0]} rows on this process, not a multiple "
                       f"of its {num_local} devices in the mesh")
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def prefetch_to_mesh(batches: Iterable[Dict[str, Any]], mesh: jax.sharding.Mesh, size: int = 2
                     ) -> Iterator[Dict[str, jax.Array]]:
  """shard_batch of each local batch, `size - 1` batches ahead: the host-to-device copies of the next batch
  overlap the current step (as flax.jax_utils.prefetch_to_device)."""
  queue = collections.deque()
  for batch in batches:
    queue.append(shard_batch(batch, mesh))
    if len(queue) >= size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
