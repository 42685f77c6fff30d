"""Sub-graph timings of the CPU train step: forward, forward+backward, loss, optimizer, depthwise layers.

  python -m bench.profile_train [--batch 8] [--parts fwd,grad,loss,lossgrad,opt,dw]
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from ssdlite_jax import optim
from ssdlite_jax.ssd.losses import multibox_loss
from ssdlite_jax.kernels.depthwise import depthwise_conv
from ssdlite_jax.zoo import build_model
from ssdlite_jax.ssd.configs import ssdlite320_config
from ssdlite_jax.models import layers


def bench(name, fn, *args, n=5):
  t0 = time.perf_counter()
  c = jax.jit(fn).lower(*args).compile()
  ct = time.perf_counter() - t0
  times = common.time_calls(lambda: jax.block_until_ready(c(*args)), n, 1)
  print(f"{name:<40} {common.median(times) * 1e3:9.1f} ms  (min {min(times) * 1e3:.1f}, compile {ct:.1f}s)",
        flush=True)
  return common.median(times)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--num_classes", type=int, default=91)
  p.add_argument("--parts", default="fwd,grad,loss,lossgrad,opt")
  p.add_argument("--kernels", default="auto", help="model.kernels: auto | cpu | xla")
  p.add_argument("--n", type=int, default=5)
  args = p.parse_args()
  parts = args.parts.split(",")
  cfg = ssdlite320_config()
  cfg.num_classes = args.num_classes
  cfg.kernels = args.kernels
  det = build_model(cfg)
  variables = det.init(jax.random.PRNGKey(0))
  images, boxes, labels, mask = common.synthetic_train_batch(args.batch, 320, args.num_classes)
  anchors = np.asarray(det.anchors, np.float32)

  def fwd(params, bs, x):
    return det.module.apply({"params": params, "batch_stats": bs}, x, train=True, mutable=["batch_stats"])

  def loss_fn(params, bs, x):
    out, upd = fwd(params, bs, x)
    losses = multibox_loss(out["cls_logits"], out["bbox_regression"], anchors, boxes, labels, mask)
    return losses["bbox_regression"] + losses["classification"]

  if "fwd" in parts:
    bench("forward (train mode)", fwd, variables["params"], variables["batch_stats"], images, n=args.n)
  if "fwdeval" in parts:
    bench("forward (eval mode)", lambda p, b, x: det.module.apply({"params": p, "batch_stats": b}, x, train=False),
          variables["params"], variables["batch_stats"], images, n=args.n)
  if "grad" in parts:
    bench("forward+loss+backward", jax.value_and_grad(loss_fn), variables["params"], variables["batch_stats"],
          images, n=args.n)
  out, _ = jax.jit(fwd)(variables["params"], variables["batch_stats"], images)
  cl, br = out["cls_logits"], out["bbox_regression"]
  lf = lambda cl, br: sum(v for k, v in multibox_loss(cl, br, anchors, boxes, labels, mask).items()
                          if k != "num_positives")
  if "loss" in parts:
    bench("loss only", lf, cl, br, n=args.n)
  if "lossgrad" in parts:
    bench("loss fwd+bwd", jax.grad(lf, argnums=(0, 1)), cl, br, n=args.n)
  if "opt" in parts:
    tx, _ = optim.make_optimizer(optim.default_optim_config(), 1000)
    st = tx.init(variables["params"])
    g = jax.tree.map(jnp.ones_like, variables["params"])
    def upd(g, st, p):
      u, st = tx.update(g, st, p)
      return jax.tree.map(jnp.add, p, u), st
    bench("optimizer update", upd, g, st, variables["params"], n=args.n)
  if "dw" in parts:
    rng = np.random.default_rng(0)
    for (h, c, k, s) in [(160, 16, 3, 1), (160, 64, 3, 2), (80, 72, 3, 1), (80, 72, 5, 2), (40, 120, 5, 1),
                         (40, 240, 3, 2), (20, 480, 3, 1), (20, 672, 5, 1), (20, 672, 5, 2), (10, 960, 5, 1)]:
      x = jnp.asarray(rng.standard_normal((args.batch, h, h, c), np.float32))
      w = jnp.asarray(rng.standard_normal((k, k, 1, c), np.float32))
      pad = layers._pad(k)
      f = functools.partial(depthwise_conv, stride=s, padding=pad)
      def fb(x, w, f=f):
        y, vjp = jax.vjp(f, x, w)
        return vjp(y)
      bench(f"dw {h}x{h}x{c} k{k} s{s} fwd", f, x, w, n=args.n)
      bench(f"dw {h}x{h}x{c} k{k} s{s} fwd+bwd", fb, x, w, n=args.n)


if __name__ == "__main__":
  main()
