"""Optimizers and learning-rate schedules of torchvision's SSD and SSDlite recipes (references/detection).

Config fields (`ml_collections.ConfigDict`, defaults from `default_optim_config()`):
  optimizer: 'sgd' (torch SGD: momentum, no Nesterov, coupled L2 decay on every parameter, BN and
    biases included) or 'adamw' (optax.adamw, decoupled decay, optax's default betas and eps).
  learning_rate: base LR for `base_batch_size` images per step (0.15).
  base_batch_size: the batch `learning_rate` is quoted for (192 = 8 GPUs x 24).
  batch_size: global batch per optimizer step; the LR is scaled by batch_size / base_batch_size.
  momentum: SGD momentum (0.9); unused by AdamW.
  weight_decay: SGD L2 coefficient / AdamW decoupled decay (4e-5).
  schedule: 'cosine' (SSDlite: CosineAnnealingLR) or 'multistep' (SSD300: MultiStepLR), both stepped per epoch.
  num_epochs: cosine period T in epochs; the LR reaches 0 at epoch T (660).
  milestones, gamma: 'multistep' multiplies the LR by gamma at each milestone epoch (SSD300: (80, 110), 0.1).
  warmup_iters: warmup length cap in steps (1000); the warmup lasts min(warmup_iters,
    steps_per_epoch - 1) steps of epoch 0; 0 disables it.
  warmup_factor: LR multiplier at step 0 of the warmup (0.001).
  cosine_per_step: False = torchvision's cosine stepped once per epoch (LR constant within an
    epoch); True = cosine evaluated at every step.
  frozen: module paths ('backbone/conv1_1') whose parameters are left out of the optimizer entirely, as
    torchvision's requires_grad=False (no update, no weight decay, no momentum state).
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import optax


def default_optim_config():
  """torchvision's SSDlite320 COCO recipe (8 x 24 images, SGD, 660 epochs)."""
  return ml_collections.ConfigDict(dict(
      optimizer="sgd",
      learning_rate=0.15,
      base_batch_size=192,
      batch_size=192,
      momentum=0.9,
      weight_decay=4e-5,
      num_epochs=660,
      warmup_iters=1000,
      warmup_factor=0.001,
      schedule="cosine",
      cosine_per_step=False,
      milestones=(),
      gamma=0.1,
      frozen=(),
  ))


def base_learning_rate(config) -> float:
  """The peak LR: learning_rate scaled linearly from base_batch_size to the global batch_size."""
  return config.learning_rate * config.batch_size / config.base_batch_size


def warmup_steps(config, steps_per_epoch) -> int:
  """The warmup length in steps: min(warmup_iters, steps_per_epoch - 1), inside epoch 0 as torchvision's."""
  return min(config.warmup_iters, steps_per_epoch - 1)


def learning_rate_schedule(config, steps_per_epoch):
  """optax schedule: optimizer step (int, 0-based) -> LR (float32; float64 with jax_enable_x64).

  lr(s) = base · warmup(s) · decay(s), base = learning_rate · batch_size / base_batch_size:
  warmup(s) = f + (1 - f) · min(s, W) / W with W = min(warmup_iters, steps_per_epoch - 1) (torch
  LinearLR stepped per iteration in epoch 0); with e = s // steps_per_epoch, decay is 'cosine'
  (1 + cos(pi · e / num_epochs)) / 2 (CosineAnnealingLR stepped after each epoch; e = s / steps_per_epoch
  when cosine_per_step) or 'multistep' gamma ** #{milestones <= e} (MultiStepLR). This closed form equals
  torch's chained recursive schedulers.
  """
  if config.schedule not in ("cosine", "multistep"):
    raise ValueError(f"optim.schedule must be 'cosine' or 'multistep', got {config.schedule!r}")
  base_lr = base_learning_rate(config)
  warmup = warmup_steps(config, steps_per_epoch)
  total_steps = config.num_epochs * steps_per_epoch

  def warmup_multiplier(step, dtype):
    if warmup > 0:
      ramp = jnp.minimum(step, warmup).astype(dtype) / warmup
      return config.warmup_factor + (1.0 - config.warmup_factor) * ramp
    # One-step epochs: torch's LinearLR(total_iters=0) applies the start factor and never lifts it.
    return config.warmup_factor if config.warmup_iters > 0 else 1.0

  def schedule(step):
    dtype = jnp.result_type(float)  # float32, or float64 under jax_enable_x64 (int32 / int stays float32)
    step = jnp.asarray(step, jnp.int32)
    if config.schedule == "multistep":
      passed = sum(((step // steps_per_epoch) >= m).astype(dtype) for m in config.milestones)
      decay = jnp.asarray(config.gamma, dtype) ** passed
      return (base_lr * warmup_multiplier(step, dtype) * decay).astype(dtype)
    if config.cosine_per_step:
      remaining = (total_steps - step).astype(dtype) / total_steps
    else:
      remaining = (config.num_epochs - step // steps_per_epoch).astype(dtype) / config.num_epochs
    # (1 + cos(pi t)) / 2 = sin^2(pi (1 - t) / 2): keeps float32 relative accuracy as the LR nears 0.
    cosine = jnp.sin(0.5 * math.pi * remaining) ** 2
    return (base_lr * warmup_multiplier(step, dtype) * cosine).astype(dtype)

  return schedule


def make_optimizer(config, steps_per_epoch):
  """(optax.GradientTransformation, schedule) for `config` (see the module docstring)."""
  schedule = learning_rate_schedule(config, steps_per_epoch)
  if config.optimizer == "sgd":
    tx = optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.trace(decay=config.momentum, nesterov=False),
        optax.scale_by_learning_rate(schedule),
    )
  elif config.optimizer == "adamw":
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
  else:
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {config.optimizer!r}")
  if config.frozen:
    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()},
                               functools.partial(_freeze_labels, tuple(config.frozen)))
  return tx, schedule


def _freeze_labels(prefixes, params):
  """'frozen' for each parameter under one of the module paths `prefixes` ('backbone/conv1_1' covers
  'backbone/conv1_1/kernel' and '.../bias'), else 'trained'."""
  path_of = lambda path: "/".join(str(getattr(k, "key", k)) for k in path) + "/"
  paths = [path_of(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  prefixes = tuple(p.rstrip("/") + "/" for p in prefixes)
  unused = [p[:-1] for p in prefixes if not any(path.startswith(p) for path in paths)]
  if unused:
    raise ValueError(f"optim.frozen: {unused} name no parameter's module (paths look like {paths[0][:-1]!r})")
  return jax.tree_util.tree_map_with_path(
      lambda p, _: "frozen" if path_of(p).startswith(prefixes) else "trained", params)
