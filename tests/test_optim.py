"""LR schedule and optimizer parity with torch, driven as references/detection train.py + engine.py."""

import warnings

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ssdlite_jax import optim
from tests.helpers import import_or_skip


def _config(**overrides):
  config = optim.default_optim_config()
  config.update(overrides)
  return config


def _torch_run(config, steps_per_epoch, num_run_epochs, grads=None, params=None, frozen=()):
  """LR at every iteration (and final params) of torch SGD/AdamW + LinearLR + CosineAnnealingLR (or
  MultiStepLR with config.schedule 'multistep').

  Epoch 0 steps LinearLR after every iteration (engine.py); the decay scheduler steps after every
  epoch (train.py), or after every iteration when config.cosine_per_step. Without `grads`, epochs
  after the first record their (constant) LR without iterating. Parameters whose index is in `frozen` are
  not given to the optimizer (requires_grad=False).
  """
  torch = import_or_skip("torch")
  base_lr = config.learning_rate * config.batch_size / config.base_batch_size
  tensors = [torch.tensor(p, requires_grad=True) for p in (params or [np.zeros(1, np.float32)])]
  trained = [t for i, t in enumerate(tensors) if i not in frozen]
  if config.optimizer == "sgd":
    opt = torch.optim.SGD(trained, lr=base_lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
  else:
    opt = torch.optim.AdamW(trained, lr=base_lr, weight_decay=config.weight_decay)
  per_step = config.cosine_per_step and config.schedule == "cosine"
  if config.schedule == "multistep":
    cosine = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(config.milestones), gamma=config.gamma)
  else:
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=config.num_epochs * (steps_per_epoch if per_step else 1))
  lrs, step = [], 0
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for epoch in range(num_run_epochs):
      warmup = None
      if epoch == 0 and config.warmup_iters > 0:
        warmup = torch.optim.lr_scheduler.LinearLR(
            opt, start_factor=config.warmup_factor,
            total_iters=min(config.warmup_iters, steps_per_epoch - 1))
      if grads is None and warmup is None and not per_step:
        lrs.extend([opt.param_groups[0]["lr"]] * steps_per_epoch)
      else:
        for _ in range(steps_per_epoch):
          lrs.append(opt.param_groups[0]["lr"])
          if grads is not None:
            for t, g in zip(tensors, grads[step]):
              t.grad = torch.tensor(g)
          opt.step()
          step += 1
          if warmup is not None:
            warmup.step()
          if per_step:
            cosine.step()
      if not per_step:
        cosine.step()
  return np.asarray(lrs), [t.detach().numpy() for t in tensors]


def _jax_lrs(config, steps_per_epoch, num_steps):
  schedule = optim.learning_rate_schedule(config, steps_per_epoch)
  return np.asarray(jax.jit(schedule)(jnp.arange(num_steps)), np.float64)


@pytest.mark.parametrize("overrides, steps_per_epoch, num_run_epochs", [
    (dict(num_epochs=5), 7, 5),
    (dict(num_epochs=5, batch_size=64), 7, 5),
    (dict(num_epochs=4, warmup_iters=3, warmup_factor=0.1), 7, 4),
    (dict(num_epochs=3), 1, 3),                          # W = 0: torch keeps the warmup factor
    (dict(num_epochs=5, warmup_iters=0), 7, 5),
    (dict(num_epochs=5, cosine_per_step=True), 7, 5),
    (dict(), 610, 660),                                  # the real recipe: 8 x 24 images, W = 609
    (dict(schedule="multistep", milestones=(2, 4), gamma=0.5, warmup_iters=3), 5, 6),
    (dict(schedule="multistep", milestones=(1,), warmup_iters=0), 3, 3),
    # SSD300's recipe: 8 x 4 images, about 3,664 steps per epoch, x0.1 at epochs 80 and 110
    (dict(schedule="multistep", milestones=(80, 110), learning_rate=0.002, base_batch_size=32, batch_size=32),
     3664, 120),
])
@pytest.mark.torch
def test_lr_sequence_matches_torch(overrides, steps_per_epoch, num_run_epochs):
  config = _config(**overrides)
  expected, _ = _torch_run(config, steps_per_epoch, num_run_epochs)
  got = _jax_lrs(config, steps_per_epoch, len(expected))
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)


def test_recipe_closed_form():
  """The recipe's LR: 0.15 (0.001 + 0.999 i / 609) in epoch 0, then 0.075 (1 + cos(pi e / 660))."""
  lrs = _jax_lrs(_config(), 610, 660 * 610)
  i = np.arange(610)
  np.testing.assert_allclose(lrs[:610], 0.15 * (0.001 + 0.999 * np.minimum(i, 609) / 609), rtol=1e-6)
  e = np.arange(1, 660)
  np.testing.assert_allclose(lrs[610:].reshape(659, 610),
                             np.repeat(0.075 * (1 + np.cos(np.pi * e / 660))[:, None], 610, axis=1),
                             rtol=1e-6)


@pytest.mark.torch
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_steps_match_torch(name):
  steps_per_epoch, num_epochs = 4, 3
  config = _config(optimizer=name, num_epochs=num_epochs, batch_size=96,
                   weight_decay=4e-5 if name == "sgd" else 0.05)
  rng = np.random.default_rng(0)
  shapes = [(5, 3), (3,), (2, 2, 4)]
  params = [rng.normal(size=s).astype(np.float32) for s in shapes]
  num_steps = steps_per_epoch * num_epochs
  grads = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(num_steps)]
  _, expected = _torch_run(config, steps_per_epoch, num_epochs, grads=grads, params=params)

  tx, _ = optim.make_optimizer(config, steps_per_epoch)

  @jax.jit
  def step(p, state, g):
    updates, state = tx.update(g, state, p)
    return optax.apply_updates(p, updates), state

  p = [jnp.asarray(x) for x in params]
  state = tx.init(p)
  for g in grads:
    p, state = step(p, state, [jnp.asarray(x) for x in g])
  for got, want, start in zip(p, expected, params):
    assert not np.allclose(want, start)
    # optax forms Adam's bias corrections from float32 betas (1 - 0.999f is 4.7e-5 off): ~1e-5 per step.
    tol = dict(rtol=1e-6, atol=1e-7) if name == "sgd" else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got), want, **tol)


@pytest.mark.torch
def test_frozen_parameters_are_outside_the_optimizer():
  """optim.frozen = torch's requires_grad=False: those tensors get no update, no weight decay, no momentum; the
  others step exactly as torch's SGD over the trained tensors only."""
  config = _config(num_epochs=2, weight_decay=5e-4, frozen=("backbone/conv1_1", "backbone/conv1_2"))
  rng = np.random.default_rng(1)
  names = [("backbone", "conv1_1", "kernel"), ("backbone", "conv1_1", "bias"), ("backbone", "conv1_2", "kernel"),
           ("backbone", "conv10_1", "kernel"), ("head", "level0", "kernel")]
  shapes = [(3, 3, 2, 4), (4,), (1, 1, 4, 4), (1, 1, 4, 2), (3, 3, 2, 8)]
  params = [rng.normal(size=s).astype(np.float32) for s in shapes]
  grads = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(6)]
  _, expected = _torch_run(config, 3, 2, grads=grads, params=params, frozen={0, 1, 2})
  tree = lambda leaves: flax.traverse_util.unflatten_dict(dict(zip(names, map(jnp.asarray, leaves))))
  tx, _ = optim.make_optimizer(config, 3)
  p = tree(params)
  state = tx.init(p)
  for g in grads:
    updates, state = tx.update(tree(g), state, p)
    p = optax.apply_updates(p, updates)
  got = flax.traverse_util.flatten_dict(p)
  for i, name in enumerate(names):
    if i < 3:
      np.testing.assert_array_equal(got[name], params[i], err_msg=str(name))
    else:
      assert not np.allclose(expected[i], params[i])
      np.testing.assert_allclose(got[name], expected[i], rtol=1e-6, atol=1e-7, err_msg=str(name))
  config.frozen = ("backbone/conv1",)   # a module path, not a string prefix: names no module
  with pytest.raises(ValueError, match=r"optim.frozen: \['backbone/conv1'\] name no parameter's module"):
    optim.make_optimizer(config, 3)[0].init(p)


def test_unknown_optimizer():
  with pytest.raises(ValueError, match="optimizer"):
    optim.make_optimizer(_config(optimizer="lamb"), 10)
