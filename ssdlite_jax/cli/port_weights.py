"""Move SSDlite weights between torchvision and ssdlite-jax checkpoints.

  python port_weights.py to-flax --weights IN.pth --out CKPT_DIR       (model variant and classes from IN.pth)
  python port_weights.py to-flax --weights ssdlite320_mobilenet_v3_large --out CKPT_DIR --num-classes 3 \
      --skip-mismatched
  python port_weights.py to-torch --weights CKPT_DIR [--step N|best] --out OUT.pth   (or OUT.safetensors)

IN/OUT may be .pth (read with torch.load(weights_only=True)) or .safetensors, IN a weights name too
(ssdlite_jax/weights.py). CKPT_DIR is the orbax checkpoint directory that train.py writes and eval.py /
predict.py read. --torch (to-flax) and --checkpoint (to-torch) are the deprecated names of --weights.
"""

import argparse
import sys

import jax
import ml_collections

from ssdlite_jax import checkpoint, files, porting
from ssdlite_jax.cli import STEP_HELP, checkpoint_step, deprecated
from ssdlite_jax.loading import load_detector
from ssdlite_jax.zoo import build_model, variant_name


def _weights(args, old_flag: str, old_value):
  """--weights, or the subcommand's deprecated name for it (with a deprecation line); exactly one."""
  if bool(args.weights) == bool(old_value):
    args.parser.error("give --weights once")
  if old_value:
    deprecated(old_flag, "--weights")
  return args.weights or old_value


def to_flax(args):
  args.torch = _weights(args, "--torch", args.torch)
  if files.isdir(args.torch):
    raise ValueError(f"--weights {args.torch}: a directory; to-flax takes a .pth or .safetensors file or a weights "
                     "name")
  detector, variables, _ = load_detector(args.torch)
  classes = detector.config.num_classes
  if args.num_classes is not None and args.num_classes != classes:
    if not args.skip_mismatched:
      raise ValueError(f"{args.torch} has {classes} classes, not --num-classes {args.num_classes}; add "
                       f"--skip-mismatched to fine-tune (fresh classification head)")
    cfg = ml_collections.ConfigDict(detector.config.to_dict())
    cfg.num_classes = args.num_classes
    target = build_model(cfg)
    variables, problems = porting.transfer(variables, detector, target, jax.random.key(args.seed))
    detector = target
    print(f"{len(problems)} tensors of {args.torch} not loaded (fresh initialisation kept):")
    for line in problems:
      print(f"  {line}")
  checkpoint.save_variables(args.out, 0, variables, detector.config)
  print(f"wrote {args.out} (step 0, num_classes={detector.config.num_classes})")


def to_torch(args):
  args.checkpoint = _weights(args, "--checkpoint", args.checkpoint)
  if not files.isdir(args.checkpoint):
    raise FileNotFoundError(f"--weights {args.checkpoint}: no such checkpoint directory")
  detector, variables, step = load_detector(args.checkpoint, step=args.step)
  cfg = detector.config
  state_dict = porting.flax_to_torch(variables, detector)
  porting.save_state_dict(state_dict, args.out)
  name = variant_name(cfg)
  # torchvision's builders (the Faster R-CNNs' BatchNorm2d build also loads the FrozenBatchNorm2d layout strictly)
  if name in ("ssdlite320_mobilenet_v3_large", "ssd300_vgg16", "fasterrcnn_mobilenet_v3_large_320_fpn",
              "fasterrcnn_mobilenet_v3_large_fpn"):
    how = (f"torchvision.models.detection.{name}(weights=None, weights_backbone=None, "
           f"num_classes={cfg.num_classes}).load_state_dict(...)")
  else:   # torchvision has no builder (docs/models.md: The SSD family)
    how = f"load_state_dict(...) on a torch SSD built as {name or 'this architecture'} ({cfg.num_classes} classes)"
  print(f"wrote {args.out} ({len(state_dict)} tensors from step {step}); load it with {how}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("to-flax", help="torchvision state_dict -> orbax checkpoint")
  p.add_argument("--weights", help=".pth or .safetensors state_dict, or a weights name")
  p.add_argument("--torch", help=argparse.SUPPRESS)
  p.add_argument("--out", required=True, help="checkpoint directory to write")
  p.add_argument("--num-classes", type=int, default=None, help="default: the class count of --torch")
  p.add_argument("--skip-mismatched", action="store_true",
                 help="fine-tuning to another --num-classes: fresh weights for the tensors that do not fit")
  p.add_argument("--seed", type=int, default=0, help="seed for re-initialised tensors")
  p.set_defaults(fn=to_flax)
  p = sub.add_parser("to-torch", help="orbax checkpoint -> torchvision state_dict")
  p.add_argument("--weights", help="checkpoint directory")
  p.add_argument("--checkpoint", help=argparse.SUPPRESS)
  p.add_argument("--step", type=checkpoint_step, default=None, help=STEP_HELP)
  p.add_argument("--out", required=True, help="output .pth or .safetensors")
  p.set_defaults(fn=to_torch)
  args = parser.parse_args(argv)
  args.parser = sub.choices[args.command]
  try:
    args.fn(args)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
