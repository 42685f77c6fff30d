"""Checkpoints: a train state survives a save and restore exactly, variables written from several devices load
on one."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ssdlite_jax import checkpoint, optim
from ssdlite_jax.distributed import make_mesh, shard_batch
from ssdlite_jax.zoo import build_model
from ssdlite_jax.ssd.configs import ssd300_vgg16_config
from ssdlite_jax.train_step import TrainState, create_train_state, make_train_step
from tests.helpers import QUICK_COMPILE_OPTIONS, subprocess_env, tiny_model_config
from tests.torch_reference import smooth_images


def test_train_state_round_trip_is_exact(tmp_path):
  """After one SGD step (momentum buffers, BN running statistics and counters, the step and the rng all moved
  from their initial values), train.py's save and restore give back every leaf bit for bit, and the variables
  and model config read back through load_variables as eval.py and predict.py read them."""
  config = tiny_model_config()
  det = build_model(config)
  tx, schedule = optim.make_optimizer(optim.default_optim_config(), steps_per_epoch=10)
  mesh = make_mesh(jax.devices()[:1])
  start = create_train_state(det, tx, jax.random.key(0), mesh)
  batch = dict(image=smooth_images(2, 128, 128, seed=0), boxes=np.array([[[4, 6, 40, 50]]] * 2, np.float32),
               labels=np.array([[2], [1]], np.int32), mask=np.ones((2, 1), bool),
               image_id=np.arange(2, dtype=np.int32), orig_size=np.full((2, 2), 128, np.int32))
  batch = shard_batch(batch, mesh)
  state, _ = make_train_step(det, tx, schedule, mesh).lower(start, batch).compile(QUICK_COMPILE_OPTIONS)(start, batch)
  state = jax.device_get(state)
  with checkpoint.train_manager(str(tmp_path / "ckpt"), keep=2) as mngr:
    checkpoint.save_train_state(mngr, state, config)
    mngr.wait_until_finished()
  fresh = create_train_state(det, tx, jax.random.key(1), mesh)
  with checkpoint.train_manager(str(tmp_path / "ckpt"), keep=2) as mngr:
    restored = jax.device_get(checkpoint.restore_train_state(mngr, fresh, int(state.step)))
  assert int(restored.step) == 1
  leaves = lambda s: jax.tree.leaves((s.params, s.batch_stats, s.opt_state, jax.random.key_data(s.rng)))
  assert not all(np.array_equal(a, b) for a, b in zip(leaves(state), leaves(jax.device_get(fresh))))
  for got, want in zip(leaves(restored), leaves(state)):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
  variables, loaded_config, step = checkpoint.load_variables(str(tmp_path / "ckpt"))
  as_json = lambda c: json.loads(json.dumps(c.to_dict()))   # tuples come back as lists
  assert step == 1 and as_json(loaded_config) == as_json(config)
  jax.tree.map(np.testing.assert_array_equal, variables, jax.device_get(state.variables))


def test_step_best_is_the_highest_ap_of_the_evaluated_steps(tmp_path):
  """step="best" (--step best) picks the evaluated step with the highest AP, not the latest step nor a step saved
  without metrics; a directory without evaluated steps says so."""
  config = tiny_model_config()
  det = build_model(config)
  tx, _ = optim.make_optimizer(optim.default_optim_config(), steps_per_epoch=10)
  state = jax.device_get(create_train_state(det, tx, jax.random.key(0), make_mesh(jax.devices()[:1])))
  with checkpoint.train_manager(str(tmp_path / "ckpt"), keep=5) as mngr:
    for step, ap in ((1, None), (2, 0.25), (3, 0.5), (4, 0.125), (5, None)):
      checkpoint.save_train_state(mngr, state.replace(step=np.int32(step)), config, ap and {"AP": ap})
    mngr.wait_until_finished()
  assert checkpoint.load_variables(str(tmp_path / "ckpt"), "best")[2] == 3
  assert checkpoint.load_variables(str(tmp_path / "ckpt"))[2] == 5
  checkpoint.save_variables(str(tmp_path / "ported"), 0, state.variables, config)
  with pytest.raises(FileNotFoundError, match="ported: no evaluated checkpoint"):
    checkpoint.load_variables(str(tmp_path / "ported"), "best")


@pytest.mark.slow
def test_checkpoint_from_more_devices_loads_on_one(tmp_path):
  """A checkpoint written with the state replicated on 4 devices (as train.py does) loads on 1 device."""
  script = (
      "import os, sys\n"
      "os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'\n"
      "import jax, numpy as np\n"
      "from jax.sharding import NamedSharding, PartitionSpec as P\n"
      "from ssdlite_jax import checkpoint\n"
      "from ssdlite_jax.ssd.configs import ssdlite320_config\n"
      "mesh = jax.make_mesh((4,), ('data',), axis_types=(jax.sharding.AxisType.Explicit,))\n"
      "v = {'params': {'a': np.arange(6, dtype=np.float32)}, 'batch_stats': {'n': np.int32(3)}}\n"
      "v = jax.device_put(v, NamedSharding(mesh, P()))\n"
      "checkpoint.save_variables(sys.argv[1], 5, v, ssdlite320_config())\n")
  subprocess.run([sys.executable, "-c", script, str(tmp_path / "ckpt")], check=True, capture_output=True,
                 env=subprocess_env())
  variables, cfg, step = checkpoint.load_variables(str(tmp_path / "ckpt"))
  assert step == 5 and cfg.num_classes == 91
  np.testing.assert_array_equal(variables["params"]["a"], np.arange(6, dtype=np.float32))
  assert int(variables["batch_stats"]["n"]) == 3


def test_model_without_batch_norm_round_trips(tmp_path):
  """A VGG model's state has batch_stats {}: it saves, restores and loads as {}, and its model config comes back
  as saved (its backbone_kwargs not merged with the default MobileNet's)."""
  config = ssd300_vgg16_config()
  tx = optax.sgd(0.1, momentum=0.9)
  params = {"backbone": {"conv1_1": {"kernel": jnp.arange(6, dtype=jnp.float32).reshape(1, 1, 2, 3)}}}
  state = TrainState(step=jnp.int32(4), params=params, batch_stats={}, opt_state=tx.init(params),
                     rng=jax.random.key(3))
  with checkpoint.train_manager(str(tmp_path / "ckpt"), keep=2) as mngr:
    checkpoint.save_train_state(mngr, state, config)
    mngr.wait_until_finished()
  blank = state.replace(step=jnp.int32(0), params=jax.tree.map(jnp.zeros_like, params))
  with checkpoint.train_manager(str(tmp_path / "ckpt"), keep=2) as mngr:
    restored = checkpoint.restore_train_state(mngr, blank, 4)
  assert int(restored.step) == 4 and restored.batch_stats == {}
  np.testing.assert_array_equal(restored.params["backbone"]["conv1_1"]["kernel"],
                                params["backbone"]["conv1_1"]["kernel"])
  variables, loaded, step = checkpoint.load_variables(str(tmp_path / "ckpt"))
  assert step == 4 and variables["batch_stats"] == {} and set(variables) == {"params", "batch_stats"}
  assert loaded.backbone == "vgg16" and loaded.backbone_kwargs.to_dict() == {"highres": False}
  assert build_model(loaded).anchors.shape == (8732, 4)
